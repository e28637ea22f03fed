"""Result rows, the printed table, ours-vs-others ratios, the issue's targets and the JSON file.

Owns presentation only: it receives finished ``Row`` values and never runs anything.
MB = 10^6 bytes; MiB = 2^20 bytes (RSS only).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

MB = 1_000_000
BASELINE_BORG = "borg-zstd3"
BASELINE_RESTIC = "restic"
RSS_LIMIT_MIB = 512.0
INCREMENTAL_SPEEDUP = 10.0


@dataclass(slots=True)
class Row:
    """One measured step of one tool variant."""

    variant: str
    family: str
    step: str  # image-full, image-incr, image-restore, tree-full, tree-incr, tree-restore
    input_bytes: int
    ok: bool
    wall_s: float = 0.0
    user_s: float = 0.0
    sys_s: float = 0.0
    peak_rss_mib: float = 0.0
    repo_bytes: int = 0  # allocated, as du counts it, after the step
    repo_apparent_bytes: int = 0
    verified: bool | None = None  # restores only: output equals the v2 source
    load_1m: float = 0.0  # host load average just before the step: > cores means contention
    error: str = ""

    @property
    def mb_s(self) -> float:
        return self.input_bytes / MB / self.wall_s if self.ok and self.wall_s > 0 else 0.0

    @property
    def cpu_s(self) -> float:
        return self.user_s + self.sys_s

    def as_json(self) -> dict[str, object]:
        out = asdict(self)
        out["mb_s"] = round(self.mb_s, 2)
        out["cpu_s"] = round(self.cpu_s, 3)
        return out


def _find(rows: Sequence[Row], variant: str, step: str) -> Row | None:
    for row in rows:
        if row.variant == variant and row.step == step and row.ok:
            return row
    return None


def format_table(rows: Sequence[Row]) -> str:
    """Plain-text, column-aligned table of all rows."""
    header = [
        "variant",
        "step",
        "input MB",
        "wall s",
        "MB/s",
        "CPU s",
        "CPU/wall",
        "RSS MiB",
        "repo MB",
        "load",
        "check",
    ]
    lines: list[list[str]] = [header]
    for r in rows:
        if not r.ok:
            lines.append(
                [
                    r.variant,
                    r.step,
                    f"{r.input_bytes / MB:.1f}",
                    "-",
                    "-",
                    "-",
                    "-",
                    "-",
                    "-",
                    f"FAILED: {r.error[:60]}",
                ]
            )
            continue
        check = "" if r.verified is None else ("sha256 ok" if r.verified else "MISMATCH")
        lines.append(
            [
                r.variant,
                r.step,
                f"{r.input_bytes / MB:.1f}",
                f"{r.wall_s:.2f}",
                f"{r.mb_s:.1f}",
                f"{r.cpu_s:.2f}",
                f"{r.cpu_s / r.wall_s:.2f}" if r.wall_s else "-",
                f"{r.peak_rss_mib:.0f}",
                f"{r.repo_bytes / MB:.1f}",
                f"{r.load_1m:.1f}",
                check,
            ]
        )
    return _align(lines, right_from=2)


def _align(lines: list[list[str]], right_from: int) -> str:
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    out = []
    for n, line in enumerate(lines):
        cells = [
            cell.ljust(widths[i]) if i < right_from or i == len(line) - 1 else cell.rjust(widths[i])
            for i, cell in enumerate(line)
        ]
        out.append("  ".join(cells).rstrip())
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


# (label, step, attribute, lower is better)
RATIO_METRICS: tuple[tuple[str, str, str, bool], ...] = (
    ("full image ingest MB/s", "image-full", "mb_s", False),
    ("incremental image ingest MB/s", "image-incr", "mb_s", False),
    ("stored size after image v1", "image-full", "repo_bytes", True),
    ("stored size after image v2", "image-incr", "repo_bytes", True),
    ("image restore MB/s", "image-restore", "mb_s", False),
    ("tree ingest MB/s (v1)", "tree-full", "mb_s", False),
    ("tree incremental ingest MB/s (v2)", "tree-incr", "mb_s", False),
    ("stored size after tree v2", "tree-incr", "repo_bytes", True),
    ("tree restore MB/s", "tree-restore", "mb_s", False),
)


def _metric(row: Row | None, attr: str) -> float | None:
    if row is None:
        return None
    value = float(getattr(row, attr))
    return value if value > 0 else None


def compute_ratios(rows: Sequence[Row], ours: str) -> list[dict[str, object]]:
    """Ratios ours/borg-zstd3 and ours/restic for each metric (None when a side is missing)."""
    out: list[dict[str, object]] = []
    for label, step, attr, lower_better in RATIO_METRICS:
        mine = _metric(_find(rows, ours, step), attr)
        entry: dict[str, object] = {"metric": label, "lower_is_better": lower_better, "ours": mine}
        for key, base in (("borg", BASELINE_BORG), ("restic", BASELINE_RESTIC)):
            theirs = _metric(_find(rows, base, step), attr)
            entry[key] = theirs
            entry[f"ours/{key}"] = (mine / theirs) if mine is not None and theirs else None
        out.append(entry)
    return out


def format_ratios(ratios: Sequence[dict[str, object]], ours: str) -> str:
    def fmt(value: object) -> str:
        return f"{value:.2f}x" if isinstance(value, float) else "n/a"

    lines = [["metric", f"{ours}/{BASELINE_BORG}", f"{ours}/{BASELINE_RESTIC}", "better is"]]
    lines.extend(
        [
            str(e["metric"]),
            fmt(e["ours/borg"]),
            fmt(e["ours/restic"]),
            "lower" if e["lower_is_better"] else "higher",
        ]
        for e in ratios
    )
    return _align(lines, right_from=1)


def compute_targets(rows: Sequence[Row], ours: str) -> list[dict[str, object]]:
    """The issue's acceptance targets for one of our variants; ``ok`` is None when unmeasurable."""
    full = _find(rows, ours, "image-full")
    incr = _find(rows, ours, "image-incr")
    restore = _find(rows, ours, "image-restore")
    b_full = _find(rows, BASELINE_BORG, "image-full")
    b_incr = _find(rows, BASELINE_BORG, "image-incr")
    b_restore = _find(rows, BASELINE_BORG, "image-restore")
    targets: list[dict[str, object]] = []

    def add(name: str, ok: bool | None, detail: str) -> None:
        targets.append({"target": name, "ok": ok, "detail": detail})

    if full and b_full:
        add(
            "full image ingest >= borg",
            full.mb_s >= b_full.mb_s,
            f"{full.mb_s:.1f} vs {b_full.mb_s:.1f} MB/s",
        )
    else:
        add("full image ingest >= borg", None, "not measured")
    if full and incr and b_full and b_incr:
        ok = full.repo_bytes <= b_full.repo_bytes and incr.repo_bytes <= b_incr.repo_bytes
        add(
            "stored size <= borg (after v1 and v2)",
            ok,
            f"v1 {full.repo_bytes / MB:.1f} vs {b_full.repo_bytes / MB:.1f} MB, "
            f"v2 {incr.repo_bytes / MB:.1f} vs {b_incr.repo_bytes / MB:.1f} MB",
        )
    else:
        add("stored size <= borg (after v1 and v2)", None, "not measured")
    if full and incr:
        add(
            f"v2 incremental >= {INCREMENTAL_SPEEDUP:.0f}x our full",
            incr.mb_s >= INCREMENTAL_SPEEDUP * full.mb_s,
            f"{incr.mb_s:.1f} vs {full.mb_s:.1f} MB/s = {incr.mb_s / full.mb_s:.1f}x",
        )
    else:
        add(f"v2 incremental >= {INCREMENTAL_SPEEDUP:.0f}x our full", None, "not measured")
    if restore and b_restore:
        add(
            "image restore >= borg",
            restore.mb_s >= b_restore.mb_s,
            f"{restore.mb_s:.1f} vs {b_restore.mb_s:.1f} MB/s",
        )
    else:
        add("image restore >= borg", None, "not measured")
    mine = [r for r in rows if r.variant == ours and r.ok]
    if mine:
        peak = max(mine, key=lambda r: r.peak_rss_mib)
        add(
            f"peak RSS <= {RSS_LIMIT_MIB:.0f} MiB",
            peak.peak_rss_mib <= RSS_LIMIT_MIB,
            f"{peak.peak_rss_mib:.0f} MiB ({peak.step})",
        )
    else:
        add(f"peak RSS <= {RSS_LIMIT_MIB:.0f} MiB", None, "not measured")
    return targets


def format_targets(targets: Sequence[dict[str, object]]) -> str:
    """One line per target: ✓ met, ✗ missed, ? not measured."""
    lines = []
    for t in targets:
        ok = t["ok"]
        mark = "✓" if ok is True else "✗" if ok is False else "?"
        lines.append((mark, str(t["target"]), str(t["detail"])))
    width = max(len(line[1]) for line in lines)
    return "\n".join(f"  {m}  {name.ljust(width)}  {detail}".rstrip() for m, name, detail in lines)
