"""Build-time boot payloads: test disks, the rescue system, bootable ISOs.

Run as ``python -m kernel {testdisk,rescue,iso} ...``. Imports no other project package and
nothing at runtime imports it. Modules: ``initramfs`` (cpio, modules, libraries, cache),
``testdisk`` (tiny bootable raw disks), ``rescue`` (NBD restore initramfs), ``iso`` (hybrid ISO).
"""
