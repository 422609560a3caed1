"""Human-readable durations and sizes for log lines (no heavy imports: the sweep's parent
process uses these while its runs' code may change on disk)."""
from __future__ import annotations


def format_duration(seconds: float) -> str:
    """``42s``, ``12m05s``, ``3h20m``."""
    s = int(round(max(seconds, 0.0)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
