"""``sftdist-sweep-report SWEEP_DIR``: compare the points of a Hydra multirun sweep from their run
directories alone, as a Markdown table, a CSV and a loss plot written into the sweep directory.

It runs on login nodes, so it imports neither torch, DeepSpeed nor transformers, and matplotlib only to
draw the plot.
"""

from __future__ import annotations

import argparse
import csv
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from sftdist.tools.run_files import flatten, parse_metrics, read_yaml

POINT_MARKERS = ("config.yaml", "metrics.jsonl", ".hydra/overrides.yaml")
# Config keys that differ between points because each point has its own run directory, not because the
# sweep varied them.
PER_RUN_KEYS = frozenset({"output_dir", "run_name", "logging.wandb_group", "launch.job_name"})
REPORT_STEM = "sweep_report"
ERR_TAIL_LINES = 2


@dataclass
class Point:
    """One run directory of the sweep, as read from disk."""

    name: str  # its path below the sweep directory, e.g. "3" or "lr_sweep/3"
    path: Path
    status: str  # finished | unfinished | failed
    rows: list[dict[str, Any]]  # metrics.jsonl rows, in step order
    config: dict[str, Any]  # config.yaml, flattened to dotted keys
    overrides: Optional[dict[str, str]]  # .hydra/overrides.yaml, when Hydra wrote one
    note: str  # why it failed, lines skipped, the latest checkpoint of an unfinished run


def natural_key(name: str) -> list:
    """Sort key putting job numbers in numeric order.

    >>> sorted(["10", "2", "b/1", "1"], key=natural_key)
    ['1', '2', '10', 'b/1']
    """
    parts = (part for part in re.split(r"(\d+)", name) if part)
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in parts]


def is_point(path: Path) -> bool:
    """Whether a directory is a run directory (or what a run that failed early left of one)."""
    return any((path / marker).is_file() for marker in POINT_MARKERS)


def find_points(sweep_dir: Path) -> list[tuple[str, Path]]:
    """The run directories of a sweep: subdirectories holding ``config.yaml``, ``metrics.jsonl`` or a Hydra
    ``.hydra/overrides.yaml``, one level down or nested one more (a sweep of sweeps); hidden folders such as
    ``.submitit`` are not points, and nothing inside a point is searched."""
    def subdirs(path: Path) -> list[Path]:
        return sorted((p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")),
                      key=lambda p: natural_key(p.name))

    found = []
    for child in subdirs(sweep_dir):
        if is_point(child):
            found.append((child.name, child))
        else:
            found += [(f"{child.name}/{g.name}", g) for g in subdirs(child) if is_point(g)]
    return found


def parse_overrides(lines: list[str]) -> dict[str, str]:
    """Hydra's ``overrides.yaml`` entries as key -> value (``+``/``++`` adds are plain keys, ``~`` deletes).

    >>> parse_overrides(["train.lr=1e-5", "+peft=lora", "~train.warmup_steps"])
    {'train.lr': '1e-5', 'peft': 'lora', 'train.warmup_steps': '(deleted)'}
    """
    pairs = (str(line).partition("=") for line in lines)
    return {key.lstrip("+~"): value if sep else "(deleted)" for key, sep, value in pairs}


def error_log_tail(point: Path, sweep_dir: Path) -> Optional[str]:
    """The last lines of the newest submitit ``*.err`` log of a point: in the point directory, or in the
    sweep's ``.submitit/<array job>_<job num>/`` (the array index is the Hydra job number)."""
    logs = [*point.glob("*.err"), *point.glob(".submitit/*/*.err"),
            *sweep_dir.glob(f".submitit/*_{point.name}/*.err")]
    for log in sorted(logs, key=lambda p: p.stat().st_mtime, reverse=True):
        tail = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
        if tail:
            return f"{log.name}: " + " / ".join(tail[-ERR_TAIL_LINES:])
    return None


def read_point(name: str, path: Path, sweep_dir: Path) -> Point:
    """Read one run directory; whatever is missing or corrupt becomes its status and note, never an error."""
    notes, config, overrides, rows = [], {}, None, []
    try:
        config = flatten(read_yaml(path / "config.yaml")) if (path / "config.yaml").is_file() else {}
    except Exception as e:  # a half-written or hand-edited file must not stop the report of the others
        notes.append(f"config.yaml unreadable ({type(e).__name__})")
    if (path / ".hydra" / "overrides.yaml").is_file():
        try:
            overrides = parse_overrides(read_yaml(path / ".hydra" / "overrides.yaml") or [])
        except Exception as e:
            notes.append(f".hydra/overrides.yaml unreadable ({type(e).__name__})")
    metrics = path / "metrics.jsonl"
    try:
        rows, skipped = parse_metrics(metrics.read_text(errors="replace"))
        notes += skipped
        failure = None if rows else "metrics.jsonl has no readable rows"
    except FileNotFoundError:
        failure = "no metrics.jsonl"
    except OSError as e:
        failure = f"metrics.jsonl unreadable ({e.strerror or type(e).__name__})"
    if failure:
        status = "failed"
        notes.insert(0, failure)
        if tail := error_log_tail(path, sweep_dir):
            notes.append(tail)
    elif (path / "final").is_dir():
        status = "finished"
    else:
        status = "unfinished"
        latest = path / "checkpoints" / "latest"
        notes.append(f"latest checkpoint {latest.read_text().strip()}" if latest.is_file()
                     else "no checkpoint")
    return Point(name, path, status, rows, config, overrides, "; ".join(notes))


def varied_keys(points: list[Point], sweep_dir: Path) -> list[str]:
    """The keys that tell the points apart: from Hydra's overrides where a point has them, else the
    config.yaml keys whose values differ between points; per-run paths are left out, and so are keys that
    all points share (unless there is a single point)."""
    sweep_paths = {str(sweep_dir.resolve()), str(sweep_dir.absolute())}

    def per_run(key: str, value: Any) -> bool:
        return key in PER_RUN_KEYS or key.startswith("hydra.") or (
            isinstance(value, str) and any(path in value for path in sweep_paths))

    configs = [p.config for p in points if p.config]
    config_keys = {k for c in configs for k, v in c.items() if not per_run(k, v)}
    config_diff = [k for k in config_keys if len({repr(c.get(k)) for c in configs}) > 1]
    keys: dict[str, None] = {}
    for point in points:
        keys |= dict.fromkeys(point.overrides if point.overrides is not None else sorted(config_diff))
    if len(points) > 1:
        keys = {k: None for k in keys if len({override_value(p, k) for p in points}) > 1}
    return list(keys)


def override_value(point: Point, key: str) -> str:
    """A point's value of a varied key: its Hydra override, else its config.yaml value, else ""."""
    if point.overrides is not None and key in point.overrides:
        return point.overrides[key]
    return str(point.config[key]) if key in point.config else ""


def wall_time(elapsed: list[float]) -> float:
    """Seconds trained over all processes of a run: ``elapsed_s`` restarts at every resume, so each
    segment adds its last value.

    >>> wall_time([10.0, 20.0, 30.0, 5.0, 15.0])
    45.0
    """
    return sum(b for b, a in zip(elapsed, [*elapsed[1:], -math.inf]) if a < b)


def last_of(rows: list[dict[str, Any]], key: str) -> Optional[dict[str, Any]]:
    """The last row that carries a number under ``key``."""
    return next((r for r in reversed(rows) if isinstance(r.get(key), (int, float))), None)


def summarize(point: Point, keys: list[str]) -> dict[str, Any]:
    """One row of the report (the CSV columns; None where a value is unknown)."""
    # step 0 is the base model's eval (the same for every point): not a result of the point's settings
    rows = point.rows
    evals = [r for r in rows if isinstance(r.get("eval_loss"), (int, float)) and r["step"] > 0]
    finite = [r for r in evals if math.isfinite(r["eval_loss"])]
    best = min(finite, key=lambda r: r["eval_loss"]) if finite else None
    final_train, final_eval = last_of(rows, "loss"), evals[-1] if evals else None
    speeds = [r["tokens_per_sec"] for r in rows if isinstance(r.get("tokens_per_sec"), (int, float))]
    elapsed = [r["elapsed_s"] for r in rows if isinstance(r.get("elapsed_s"), (int, float))]
    max_steps = point.config.get("train.max_steps")
    probe = last_of([r for r in rows if r["step"] > 0], "forgetting/answer_agreement")
    return {"point": point.name, **{k: override_value(point, k) for k in keys}, "status": point.status,
            "steps_done": rows[-1]["step"] if rows else None,
            "max_steps": max_steps if isinstance(max_steps, int) and max_steps > 0 else None,
            "final_train_loss": final_train["loss"] if final_train else None,
            "best_eval_loss": best["eval_loss"] if best else None,
            "best_eval_step": best["step"] if best else None,
            "final_eval_loss": final_eval["eval_loss"] if final_eval else None,
            "final_eval_step": final_eval["step"] if final_eval else None,
            "final_answer_agreement": probe["forgetting/answer_agreement"] if probe else None,
            "final_forgetting_kl": probe.get("forgetting/kl") if probe else None,
            "mean_tokens_per_sec": sum(speeds) / len(speeds) if speeds else None,
            "wall_time_s": wall_time(elapsed) if elapsed else None, "note": point.note}


def best_row(summary: list[dict[str, Any]]) -> Optional[tuple[dict[str, Any], str]]:
    """The point with the lowest final eval loss among those with eval, or, where none has eval, the lowest
    final train loss; failed points never, unfinished ones may be. Returns it and the metric used."""
    usable = [r for r in summary if r["status"] != "failed"]
    has_eval = any(r["final_eval_loss"] is not None for r in usable)
    metric = "final_eval_loss" if has_eval else "final_train_loss"
    ranked = [r for r in usable if r[metric] is not None and math.isfinite(r[metric])]
    return (min(ranked, key=lambda r: r[metric]), metric) if ranked else None


def best_line(summary: list[dict[str, Any]], keys: list[str]) -> str:
    """The sentence naming the best point, with its values and, if it did not finish, a warning."""
    found = best_row(summary)
    if found is None:
        return "best point: none (no point has a finite loss)"
    row, metric = found
    step = row["final_eval_step"] if metric == "final_eval_loss" else row["steps_done"]
    line = f"best point: {label(row, keys)}, {metric.replace('_', ' ')} {row[metric]:.4f} at step {step}"
    return line + (f" (UNFINISHED: {steps_text(row)} steps)" if row["status"] == "unfinished" else "")


def label(row: dict[str, Any], keys: list[str]) -> str:
    """``3 (train.lr=1e-05)``: the point name and its varied values, for the best line and the legend."""
    values = ", ".join(f"{k}={row[k]}" for k in keys)
    return f"{row['point']} ({values})" if values else row["point"]


def steps_text(row: dict[str, Any]) -> str:
    """``40/100``, or ``40`` when max_steps is unknown ("" for a point without metrics)."""
    if row["steps_done"] is None:
        return ""
    return f"{row['steps_done']}/{row['max_steps']}" if row["max_steps"] else str(row["steps_done"])


def duration_text(seconds: Optional[float]) -> str:
    """A wall time for people.

    >>> [duration_text(s) for s in (None, 42.4, 75.0, 3725.0)]
    ['', '42s', '1m15s', '1h02m']
    """
    if seconds is None:
        return ""
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def number_text(value: Optional[float], fmt: str = ".4f") -> str:
    """A number for the table, "" when unknown."""
    return "" if value is None else format(value, fmt)


def eval_text(value: Optional[float], step: Optional[int]) -> str:
    """``1.2345 (step 40)``, or "" for a point without eval."""
    return "" if value is None else f"{number_text(value)} (step {step})"


def markdown_columns(keys: list[str]) -> list[tuple[str, Callable[[dict[str, Any]], str]]]:
    """(header, cell) pairs of the Markdown table; the headers say how each number is made."""
    return [("point", lambda r: r["point"]), *((k, lambda r, k=k: r[k]) for k in keys),
            ("status", lambda r: r["status"]), ("steps done/max", steps_text),
            ("final train loss (last step)", lambda r: number_text(r["final_train_loss"])),
            ("best eval loss (step)", lambda r: eval_text(r["best_eval_loss"], r["best_eval_step"])),
            ("final eval loss (step)", lambda r: eval_text(r["final_eval_loss"], r["final_eval_step"])),
            ("probe answers kept (forgetting)", lambda r: number_text(r["final_answer_agreement"], ".0%")),
            ("probe KL from base", lambda r: number_text(r["final_forgetting_kl"], ".3f")),
            ("mean tokens/s (over steps)", lambda r: number_text(r["mean_tokens_per_sec"], ",.0f")),
            ("wall time", lambda r: duration_text(r["wall_time_s"])), ("note", lambda r: r["note"])]


def markdown_table(summary: list[dict[str, Any]], keys: list[str]) -> str:
    """The report as a Markdown table, one row per point."""
    columns = markdown_columns(keys)
    cell = lambda text: str(text).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = ["| " + " | ".join(cell(h) for h, _ in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(f(r)) for _, f in columns) + " |" for r in summary]
    return "\n".join(lines)


def write_csv(summary: list[dict[str, Any]], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(summary[0]))
        writer.writeheader()
        writer.writerows(summary)


def plot_losses(points: list[Point], labels: list[str], path: Path) -> None:
    """Train loss (left) and eval loss (right) against step, one line per point that has them."""
    import matplotlib

    matplotlib.use("Agg")  # no display on login nodes
    import matplotlib.pyplot as plt

    fig, (train_ax, eval_ax) = plt.subplots(1, 2, figsize=(13, 5))
    for ax, key, title in ((train_ax, "loss", "train loss"), (eval_ax, "eval_loss", "eval loss")):
        for index, (point, text) in enumerate(zip(points, labels)):
            rows = [r for r in point.rows if isinstance(r.get(key), (int, float))]
            if rows:
                ax.plot([r["step"] for r in rows], [r[key] for r in rows],
                        marker="." if key != "loss" else None,  # eval points are sparse
                        color=f"C{index % 10}",  # a point keeps its colour in both panels
                        label=text + (" [unfinished]" if point.status == "unfinished" else ""))
        ax.set(title=title, xlabel="step (optimizer)", ylabel=key)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, f"no {title} logged", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: Optional[list[str]] = None) -> int:
    """Write ``sweep_report.{md,csv,png}`` into the sweep directory and print the table and the best point.

    Returns:
        0 when the report was written (failed points included), 2 when the directory is missing or holds
        no points.
    """
    parser = argparse.ArgumentParser(prog="sftdist-sweep-report", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", type=Path, help="the Hydra multirun directory (hydra.sweep.dir)")
    sweep_dir = parser.parse_args(argv).sweep_dir
    if not sweep_dir.is_dir():
        why = "is not a directory" if sweep_dir.exists() else "does not exist"
        print(f"sftdist-sweep-report: sweep directory {sweep_dir} {why}", file=sys.stderr)
        return 2
    points = [read_point(name, path, sweep_dir) for name, path in find_points(sweep_dir)]
    if not points:
        hint = ("; it is itself a run directory: pass the sweep directory above it"
                if is_point(sweep_dir) else "")
        print(f"sftdist-sweep-report: no sweep points in {sweep_dir} (no subdirectory holds config.yaml, "
              f"metrics.jsonl or .hydra/overrides.yaml){hint}", file=sys.stderr)
        return 2
    keys = varied_keys(points, sweep_dir)
    summary = [summarize(p, keys) for p in points]
    table, best = markdown_table(summary, keys), best_line(summary, keys)
    out = sweep_dir / REPORT_STEM
    out.with_suffix(".md").write_text(f"# Sweep report: {sweep_dir.resolve().name}\n\n{table}\n\n{best}\n")
    write_csv(summary, out.with_suffix(".csv"))
    written = [out.with_suffix(".md"), out.with_suffix(".csv")]
    try:
        plot_losses(points, [label(r, keys) for r in summary], out.with_suffix(".png"))
        written.append(out.with_suffix(".png"))
    except ImportError as e:  # the table matters more than the plot
        print(f"sftdist-sweep-report: no plot ({e}); pip install matplotlib", file=sys.stderr)
    print(table)
    print(best)
    print("wrote " + ", ".join(map(str, written)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
