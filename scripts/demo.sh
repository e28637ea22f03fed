#!/usr/bin/env bash
# The main job end to end on the embedded default repository ./var/demo:
# back up a generated disk image (full), change it, back it up again (incremental),
# list the points, restore the latest, check its sha256, show dedup statistics.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
DEMO=var/demo
REPO=$DEMO/repo
IMG=$DEMO/disk.img
OUT=$DEMO/restored.img
rm -rf "$DEMO"
mkdir -p "$DEMO"

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "generate a 256 MiB disk image: MBR + ext4 with real files, free space, a copy of /usr/share/doc"
truncate -s 256M "$IMG"
printf 'label: dos\nstart=2048, type=83\n' | sfdisk -q "$IMG"
truncate -s 255M "$DEMO/p1.img"
mkfs.ext4 -q -F -d /usr/share/doc "$DEMO/p1.img"
dd if="$DEMO/p1.img" of="$IMG" bs=1M seek=1 conv=notrunc,sparse status=none
rm "$DEMO/p1.img"

step "appliance init"
appliance --repo "$REPO" init --compression zstd

step "full backup"
appliance --repo "$REPO" backup image "$IMG" --source vm1 --mode full

step "change 3 places in the image, then an incremental backup"
python3 - "$IMG" <<'PY'
import os, sys
with open(sys.argv[1], "r+b") as fh:
    for off in (40 << 20, 90 << 20, 200 << 20):
        fh.seek(off)
        fh.write(os.urandom(8192))
PY
appliance --repo "$REPO" backup image "$IMG" --source vm1 --mode incremental

step "backup points"
appliance --repo "$REPO" points

step "restore vm1@latest"
appliance --repo "$REPO" restore vm1@latest "$OUT"
src=$(sha256sum "$IMG" | cut -d' ' -f1)
dst=$(sha256sum "$OUT" | cut -d' ' -f1)
echo "source   $src"
echo "restored $dst"
[ "$src" = "$dst" ] || { echo "MISMATCH" >&2; exit 1; }

step "mount the repository (FUSE): raw disks and the files inside them, no copy"
MNT=$DEMO/mnt
mkdir -p "$MNT"
appliance --repo "$REPO" mount "$MNT" --log-file "$DEMO/mount.log"
trap 'appliance --repo "$REPO" umount "$MNT" 2>/dev/null || true' EXIT
ls -l "$MNT/vm1/"
mnt=$(sha256sum "$MNT/vm1/latest/disk0.img" | cut -d' ' -f1)
echo "mounted  $mnt  $MNT/vm1/latest/disk0.img"
[ "$mnt" = "$src" ] || { echo "MOUNT MISMATCH" >&2; exit 1; }
echo "files inside partition 1 of the image, read in userspace:"
ls "$MNT/vm1/latest/disk0/p1/" | sed -n 1,5p
cmp "$MNT/vm1/latest/disk0/p1/python3/copyright" /usr/share/doc/python3/copyright && echo "  python3/copyright matches the original"
appliance --repo "$REPO" umount "$MNT"
trap - EXIT

step "export every point over NBD; read vm1@latest/disk0 back with nbdcopy"
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
appliance --repo "$REPO" nbd serve --listen "127.0.0.1:$PORT" > "$DEMO/nbd.log" 2>&1 &
NBD_PID=$!
trap 'kill $NBD_PID 2>/dev/null || true' EXIT
for _ in $(seq 50); do nbdinfo --list "nbd://127.0.0.1:$PORT" >/dev/null 2>&1 && break; sleep 0.2; done
nbdinfo --list --json "nbd://127.0.0.1:$PORT" | python3 -c 'import json,sys; [print("  export", e["export-name"], e.get("export-size")) for e in json.load(sys.stdin)["exports"]]'
nbdcopy "nbd://127.0.0.1:$PORT/vm1@latest/disk0" "$DEMO/nbd-copy.img"
nbd=$(sha256sum "$DEMO/nbd-copy.img" | cut -d' ' -f1)
echo "nbdcopy  $nbd"
[ "$nbd" = "$src" ] || { echo "NBD MISMATCH" >&2; exit 1; }
kill "$NBD_PID"; wait "$NBD_PID" 2>/dev/null || true
trap - EXIT
rm -f "$DEMO/nbd-copy.img"

step "instant recovery: back up a tiny bootable VM disk, boot it straight from the backup"
python3 -m kernel testdisk "$DEMO/bootvm.img" --marker DEMO-VM
appliance --repo "$REPO" backup image "$DEMO/bootvm.img" --source bootvm --mode full
appliance --repo "$REPO" boot bootvm@latest --name demo --serial "$DEMO/serial.log"
for _ in $(seq 120); do grep -q "DEMO-VM DONE" "$DEMO/serial.log" 2>/dev/null && break; sleep 0.5; done
grep -E "DEMO-VM (BOOTED|DONE)" "$DEMO/serial.log" || { echo "VM did not boot" >&2; exit 1; }
appliance --repo "$REPO" stop demo --commit
appliance --repo "$REPO" points --source bootvm

step "verify"
appliance --repo "$REPO" verify

step "dedup statistics"
appliance --repo "$REPO" stats --json > "$DEMO/stats.json"
appliance --repo "$REPO" stats

echo
echo "demo OK: restored image sha256 matches ($dst)"
