#!/usr/bin/env bash
# Installs what the appliance, its tests and its benchmarks need: Debian packages and ./.venv.
# Idempotent: each step is skipped when its stamp is newer than the inputs that define it.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  python3-venv python3-dev build-essential pkg-config
  fuse3 libfuse3-dev liblzo2-dev libvirt-dev
  nbdkit nbdkit-plugin-python libnbd-bin python3-libnbd qemu-utils
  qemu-system-x86 qemu-block-extra ipxe ipxe-qemu tgt dnsmasq
  linux-image-amd64 busybox-static syslinux syslinux-common extlinux isolinux
  mtools dosfstools xorriso e2fsprogs xfsprogs ntfs-3g fdisk gdisk grub-efi-amd64-bin grub-common open-iscsi gcc libc6-dev
  libvirt-daemon-system borgbackup restic python3-pyfuse3 ovmf time cpio iproute2 kmod
)

stamp_dir=.venv/.stamps
apt_stamp=/var/lib/dr-appliance-apt.stamp
want="${APT_PACKAGES[*]}"

if [ ! -f "$apt_stamp" ] || [ "$(cat "$apt_stamp")" != "$want" ]; then
  missing=()
  for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "bootstrap: installing Debian packages: ${missing[*]}"
    if [ "$(id -u)" -ne 0 ]; then echo "bootstrap: need root for apt-get" >&2; exit 1; fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
  echo "$want" > "$apt_stamp"
fi

# The venv uses Debian's Python so nbdkit's embedded interpreter (Debian 3.11) can import
# the same compiled packages.
if [ ! -x .venv/bin/python ]; then
  /usr/bin/python3 -m venv .venv
fi
mkdir -p "$stamp_dir"
if [ ! -f "$stamp_dir/pip" ] || [ pyproject.toml -nt "$stamp_dir/pip" ]; then
  echo "bootstrap: installing Python packages into .venv"
  if ! { .venv/bin/python -m pip install -q --upgrade pip setuptools wheel &&
         .venv/bin/python -m pip install -q -e '.[dev]'; } >"$stamp_dir/pip.log" 2>&1; then
    cat "$stamp_dir/pip.log" >&2
    echo "bootstrap: pip install failed" >&2
    exit 1
  fi
  touch "$stamp_dir/pip"
fi

# The acceptance commands and the README call `appliance` bare: put this checkout's on PATH
# (root only; an existing link is re-pointed, a file that is not a link is left alone).
link=/usr/local/bin/appliance
if [ "$(id -u)" -eq 0 ] && [ -d /usr/local/bin ] && { [ -L "$link" ] || [ ! -e "$link" ]; }; then
  target="$(pwd)/.venv/bin/appliance"
  if [ "$(readlink "$link" 2>/dev/null)" != "$target" ]; then
    ln -sfn "$target" "$link"
    echo "bootstrap: $link -> $target"
  fi
fi
