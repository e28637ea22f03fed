"""vfs: the read-only FUSE view of the repository (`appliance mount`).

* `vfs.tree`: protocol-free namespace (inodes, attributes, lookup, readdir, read) over the
  store and `image/`; synchronous and thread-safe, no pyfuse3 or trio.
* `vfs.fuse`: thin pyfuse3 adapter (`Operations`, `@fuse_op` error mapping, `serve`); store
  work runs on worker threads under a per-mount CapacityLimiter.

Imports `dedupstore` and `image` only; siblings (nbd/, pxe/) never import it.
"""
