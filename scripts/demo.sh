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

step "verify"
appliance --repo "$REPO" verify

step "dedup statistics"
appliance --repo "$REPO" stats

echo
echo "demo OK: restored image sha256 matches ($dst)"
