"""`appliance selftest`: prove this machine can back up, restore, export and mount.

Runs the product's real paths on a throw-away encrypted repository in a temporary directory:
the store (full + incremental backup of a generated image, verify, restore, sha256), the NBD
export (nbdkit + our plugin, read back with `nbdcopy`) and the FUSE mount (`appliance mount`
as a daemon, the image read back through the kernel). A part whose tools are missing (no
nbdkit, no /dev/fuse) is reported as skipped, not failed. Used after installing the appliance
and by support ("does the stack work here?"). Touches nothing outside its temporary directory.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import dedupstore as ds

from .._ui import emit_json

IMAGE_MIB = 8
PASSPHRASE = "appliance-selftest"  # noqa: S105 (a throw-away repository's, by design)
SOURCE = "selftest"
#: The CLI as a child process, independent of how `appliance` was installed.
CLI = [sys.executable, "-c", "import sys; from appliance.cli import main; "
       "sys.argv[0] = 'appliance'; sys.exit(main())"]  # fmt: skip


class SkipStep(Exception):
    """This machine lacks what the step needs (said in the message)."""


@dataclass
class Step:
    name: str
    status: str  # "ok" | "failed" | "skipped"
    seconds: float
    detail: str


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("selftest", help="back up, restore, export (NBD) and mount (FUSE) a "
                       "generated image in a temporary repository; report what works")  # fmt: skip
    p.add_argument("--json", action="store_true")
    p.add_argument("--keep", metavar="DIR", type=Path,
                   help="work in a new directory under DIR and keep it")  # fmt: skip
    p.set_defaults(func=cmd_selftest)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _make_image(path: Path) -> None:
    """Zeros, random bytes and repeated text, 1 MiB each, so dedup and compression both act."""
    rnd = random.Random(7)
    with path.open("wb") as f:
        for i in range(IMAGE_MIB):
            kind = i % 3
            if kind == 0:
                f.write(bytes(1 << 20))
            elif kind == 1:
                f.write(rnd.randbytes(1 << 20))
            else:
                f.write((f"selftest line {i} " * 70000).encode()[: 1 << 20])


class SelfTest:
    """The steps, in order; each needs the ones before it."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.repo = work / "repo"
        self.image = work / "disk.img"
        self.point = ""
        self.sha = ""

    def store(self) -> str:
        _make_image(self.image)
        ds.Repository.create(self.repo, encryption="aes-256-gcm", passphrase=PASSPHRASE)
        with ds.Repository.open(self.repo, passphrase=PASSPHRASE, writable=True) as repo:
            ds.backup_image(repo, [self.image], source=SOURCE, mode="full")
            with self.image.open("r+b") as f:  # change 64 KiB, then an incremental point
                f.seek(3 << 20)
                f.write(os.urandom(65536))
            point = ds.backup_image(repo, [self.image], source=SOURCE, mode="incremental")
            report = ds.verify(repo)
            if not report.ok:
                raise RuntimeError(f"verify found damage: {report}")
            out = self.work / "restored.img"
            ds.restore_image(repo, point, out)
        self.sha = _sha256(self.image)
        if _sha256(out) != self.sha:
            raise RuntimeError("the restored image differs from the original")
        out.unlink()
        self.point = point.name
        return f"2 points, restore of {self.point} matches (sha256 {self.sha[:12]})"

    def nbd(self) -> str:
        from nbd import NbdServer

        for tool in ("nbdkit", "nbdcopy"):
            if shutil.which(tool) is None:
                raise SkipStep(f"{tool} not installed")
        out = self.work / "nbd.img"
        with NbdServer(self.repo, socket=self.work / "nbd.sock", passphrase=PASSPHRASE) as srv:
            uri = srv.uri(f"{self.point}/disk0")
            subprocess.run(["nbdcopy", uri, str(out)], check=True, capture_output=True,
                           timeout=120)  # fmt: skip
        if _sha256(out) != self.sha:
            raise RuntimeError("the image read over NBD differs from the original")
        out.unlink()
        return f"nbdcopy of {self.point}/disk0 matches"

    def fuse(self) -> str:
        if not Path("/dev/fuse").exists():
            raise SkipStep("/dev/fuse missing (modprobe fuse)")
        if shutil.which("fusermount3") is None:
            raise SkipStep("fusermount3 not installed (fuse3)")
        mnt = self.work / "mnt"
        mnt.mkdir()
        env = {**os.environ, "APPLIANCE_PASSPHRASE": PASSPHRASE}
        subprocess.run([*CLI, "--repo", str(self.repo), "mount", str(mnt), self.point],
                       check=True, capture_output=True, env=env, timeout=120)  # fmt: skip
        try:
            if _sha256(mnt / "disk0.img") != self.sha:
                raise RuntimeError("the image read through the FUSE mount differs")
        finally:
            subprocess.run([*CLI, "umount", str(mnt)], check=False, capture_output=True,
                           env=env, timeout=60)  # fmt: skip
            if os.path.ismount(mnt):
                subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False,
                               capture_output=True, timeout=30)  # fmt: skip
        return "disk0.img read through the kernel matches"

    def run(self, report: Callable[[Step], None]) -> list[Step]:
        steps: list[Step] = []
        for name, fn in (("store", self.store), ("nbd", self.nbd), ("fuse", self.fuse)):
            if steps and steps[0].status != "ok":
                steps.append(Step(name, "skipped", 0.0, "the store step failed"))
                report(steps[-1])
                continue
            start = time.monotonic()
            try:
                step = Step(name, "ok", 0.0, fn())
            except SkipStep as exc:
                step = Step(name, "skipped", 0.0, str(exc))
            except Exception as exc:  # noqa: BLE001 (a self-test reports every failure)
                step = Step(name, "failed", 0.0, f"{type(exc).__name__}: {_one_line(exc)}")
            step.seconds = round(time.monotonic() - start, 2)
            steps.append(step)
            report(step)
        return steps


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    if isinstance(exc, subprocess.CalledProcessError) and exc.stderr:
        err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else exc.stderr
        text = err.strip().splitlines()[-1] if err.strip() else text
    return " ".join(text.split())


def cmd_selftest(args: argparse.Namespace) -> int:
    def show(step: Step) -> None:
        if not args.json:
            print(f"{step.name:<6} {step.status.upper():<8} {step.seconds:6.2f} s  {step.detail}",
                  flush=True)  # fmt: skip

    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix="selftest-", dir=args.keep))
        steps = SelfTest(work).run(show)
    else:
        with tempfile.TemporaryDirectory(prefix="appliance-selftest-") as td:
            steps = SelfTest(Path(td)).run(show)
    ok = all(s.status != "failed" for s in steps)
    if args.json:
        emit_json({"ok": ok, "steps": [asdict(s) for s in steps]})
    else:
        print("selftest OK" if ok else "selftest FAILED")
    return 0 if ok else 1
