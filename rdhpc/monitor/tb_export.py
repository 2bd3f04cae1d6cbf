"""Chosen TensorBoard scalars of one or more runs -> CSV and PNG, for papers and reports.

    python tools/tb_export.py runs/x --tags 'train/loss,val/loss_r*' --out report/
    python tools/tb_export.py runs/a runs/b --tags train/loss --out report/ --smooth 0.9

Reads every event file below each run folder (TensorBoard's own reader). Writes `scalars.csv` (one
row per run, tag and step: run, tag, step, wall_time, value) and one PNG per tag with a line per run
(and per event folder inside a run, e.g. RUN/tensorboard and RUN/eval/step*/tensorboard). Tags are
exact names or shell-style patterns (`val/loss_r*`); a pattern that matches nothing is an error that
lists the tags there are.
"""

from __future__ import annotations

import csv
import fnmatch
import math
import re
from pathlib import Path

from rdhpc.errors import UserError


class ExportTagsError(UserError, ValueError):
    pass


def read_scalars(run_dir: str | Path) -> dict[str, dict[str, list[tuple[int, float, float]]]]:
    """{event folder relative to run_dir: {tag: [(step, wall_time, value), ...]}}"""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise ExportTagsError(f"{run_dir}: no such run folder")
    folders = sorted({p.parent for p in run_dir.rglob("events.out.tfevents.*")})
    if not folders:
        raise ExportTagsError(f"{run_dir}: no TensorBoard event files below it")
    out = {}
    for folder in folders:
        events = EventAccumulator(str(folder), size_guidance={"scalars": 0})  # 0: keep every point
        events.Reload()
        name = str(folder.relative_to(run_dir)) if folder != run_dir else "."
        out[name] = {tag: sorted((e.step, e.wall_time, e.value) for e in events.Scalars(tag))
                     for tag in events.Tags()["scalars"]}
    return out


def select_tags(available: set[str], patterns: list[str]) -> list[str]:
    chosen, missing = [], []
    for pattern in patterns:
        hits = sorted(t for t in available if fnmatch.fnmatchcase(t, pattern))
        if not hits:
            missing.append(pattern)
        chosen += [t for t in hits if t not in chosen]
    if missing:
        raise ExportTagsError(f"--tags: no scalar matches {missing}; the runs have {sorted(available)}")
    return chosen


def smooth(values: list[float], weight: float) -> list[float]:
    """TensorBoard's exponential moving average (debiased)."""
    if weight <= 0:
        return list(values)
    out, last, count = [], 0.0, 0
    for v in values:
        if not math.isfinite(v):
            out.append(v)
            continue
        count += 1
        last = last * weight + (1 - weight) * v
        out.append(last / (1 - weight ** count))
    return out


def export(run_dirs: list[str | Path], tags: list[str], out: str | Path, smoothing: float = 0.0,
           log_x: bool = False, log=print) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs = {str(r): read_scalars(r) for r in run_dirs}
    available = {t for folders in runs.values() for tags_ in folders.values() for t in tags_}
    chosen = select_tags(available, tags)
    rows = 0
    with open(out / "scalars.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["run", "folder", "tag", "step", "wall_time", "value"])
        for run, folders in runs.items():
            for folder, scalars in folders.items():
                for tag in chosen:
                    for step, wall, value in scalars.get(tag, []):
                        writer.writerow([run, folder, tag, step, f"{wall:.3f}", repr(value)])
                        rows += 1
    pngs = []
    for tag in chosen:
        fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
        for run, folders in runs.items():
            for folder, scalars in folders.items():
                points = scalars.get(tag)
                if not points:
                    continue
                label = run if len(folders) == 1 else f"{run}/{folder}"
                ax.plot([p[0] for p in points], smooth([p[2] for p in points], smoothing), label=label)
        ax.set_xlabel("depth" if tag.startswith("eval/") and "_r" not in tag else "step")
        ax.set_ylabel(tag)
        if log_x:
            ax.set_xscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
        ax.set_title(tag + (f" (smoothed {smoothing})" if smoothing else ""))
        fig.tight_layout()
        png = out / (re.sub(r"[^A-Za-z0-9_.-]+", "_", tag) + ".png")
        fig.savefig(png)
        plt.close(fig)
        pngs.append(str(png))
    log(f"[tb-export] {len(chosen)} tag(s) of {len(runs)} run(s): {rows} rows -> {out / 'scalars.csv'}; "
        f"{len(pngs)} PNG(s) in {out}")
    return {"tags": chosen, "csv": str(out / "scalars.csv"), "png": pngs, "rows": rows}
