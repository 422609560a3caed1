"""A record()/dump() logger writing ``progress.csv``, TensorBoard events and a one-line stdout
summary per iteration.  CSV values are written with full precision (repr), so two runs with
the same seed give byte-identical columns apart from the ``time/`` ones."""
from __future__ import annotations

import csv
import math
import os
from pathlib import Path

import numpy as np

SUMMARY_KEYS = (
    ("meta_test/return", "return", "{:.2f}"),
    ("meta_test/success_rate", "success", "{:.2f}"),
    ("relabel/fraction_relabeled", "relabeled", "{:.2f}"),
    ("time/collect_s", "collect", "{:.1f}s"),
    ("time/relabel_s", "relabel", "{:.1f}s"),
    ("time/train_s", "train", "{:.1f}s"),
    ("time/eval_s", "eval", "{:.1f}s"),
)


class Logger:
    def __init__(self, run_dir, tensorboard: bool = True, echo=print, purge_step: int | None = None):
        self.run_dir = Path(run_dir)
        self.csv_path = self.run_dir / "progress.csv"
        self.echo = echo
        self.row: dict[str, float] = {}
        self.keys: list[str] = []
        if self.csv_path.exists():
            with open(self.csv_path, newline="") as fh:
                header = next(csv.reader(fh), None)
            self.keys = list(header or [])
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.run_dir / "tb"), purge_step=purge_step)

    def record(self, key: str, value) -> None:
        """Integers (iteration, env_steps, counts) are kept exact; everything else is a float."""
        self.row[key] = int(value) if isinstance(value, (int, np.integer)) and not isinstance(value, bool) else float(value)

    def record_dict(self, values: dict) -> None:
        for k, v in values.items():
            self.record(k, v)

    def dump(self, step: int) -> dict[str, float]:
        row, self.row = self.row, {}
        new = [k for k in row if k not in self.keys]
        if new:
            self._extend_header(self.keys + new)
        with open(self.csv_path, "a", newline="") as fh:
            csv.writer(fh).writerow([_fmt(row.get(k, math.nan)) for k in self.keys])
            fh.flush()
            os.fsync(fh.fileno())
        if self.tb is not None:
            for k, v in row.items():
                if math.isfinite(v):
                    self.tb.add_scalar(k, v, step)
            self.tb.flush()
        return row

    def _extend_header(self, keys: list[str]) -> None:
        rows = []
        if self.csv_path.exists():
            with open(self.csv_path, newline="") as fh:
                rows = list(csv.DictReader(fh))
        tmp = self.csv_path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(keys)
            for r in rows:
                w.writerow([r.get(k, "nan") or "nan" for k in keys])
        os.replace(tmp, self.csv_path)
        self.keys = keys

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None


def _fmt(v) -> str:
    return str(v) if isinstance(v, int) else repr(float(v))


def summary_line(it: int, total: int, row: dict[str, float]) -> str:
    parts = [f"iter {it}/{total}", f"steps {int(row.get('env_steps', 0)):,}"]
    for key, label, fmt in SUMMARY_KEYS:
        if key in row and math.isfinite(row[key]):
            parts.append(f"{label} {fmt.format(row[key])}")
    return " | ".join(parts)


def truncate_csv(path, column: str, last: int) -> None:
    """Keep the header and the rows whose ``column`` is <= ``last`` (used by resume)."""
    path = Path(path)
    if not path.exists():
        return
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    if not rows:
        return
    col = rows[0].index(column)
    kept = [rows[0]] + [r for r in rows[1:] if r and float(r[col]) <= last]
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", newline="") as fh:
        csv.writer(fh).writerows(kept)
    os.replace(tmp, path)


def read_progress(path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))
