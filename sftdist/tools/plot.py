"""``sftdist-plot RUN_DIR [RUN_DIR ...] [--out DIR]``: draw the curves of one or more training runs as PNGs,
from each run directory's ``metrics.jsonl`` (and ``config.yaml``, which says which data sources are generic).

Several run directories overlay on the same figures, one colour per run, labelled by their directory names
(by their last two path components when names collide), to compare the points of a sweep.

Figures, each skipped (with a note on stderr) when no run logged what it shows:
  loss.png        train loss per step, overall and per source (faint: raw; bold: centred moving average)
  eval_loss.png   eval loss, overall and per source, including the step-0 baseline
  forgetting.png  the forgetting probe's drift from the base model (answer agreement, KL), and the change of each
                  generic source's eval loss since step 0 (all sources if none is generic)
  lr.png          learning rate
  throughput.png  tokens/s, supervised tokens/s and step time (faint: raw; bold: rolling median)
  mfu.png         model FLOPs utilisation, in percent of peak (mfu is logged as a fraction)
  memory.png      host and device memory (the mem/* keys)

Output folder (--out): RUN_DIR/plots for a single run; ./plots when several runs are compared.

It runs on login nodes, so it imports neither torch, DeepSpeed nor transformers, and matplotlib only to draw.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import statistics
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from sftdist.tools.run_files import parse_metrics, read_yaml

STEP_LABEL = "step (optimizer)"
LOSS_LABEL = "cross-entropy (nats/token)"
DEFAULT_MULTI_RUN_OUT = Path("plots")
# Smoothing window, as a share of a curve's points: enough to see the trend of a noisy per-step loss without
# lagging behind its early fall.
SMOOTH_SHARE = 1 / 12
MAX_SMOOTH_WINDOW = 200
PANEL_COLUMNS = 3


class PlotError(Exception):
    """A run directory that cannot be plotted; the message names its path."""


@dataclass
class Run:
    """One run directory, as read from disk."""

    label: str  # legend text: the directory name, or its last two path components when names collide
    path: Path
    rows: list[dict[str, Any]]  # metrics.jsonl rows, in step order
    sources: list[str] = field(default_factory=list)  # data.sources names from config.yaml, in config order
    generic: list[str] = field(default_factory=list)  # the generic (replay) ones among them
    color: str = "C0"  # one colour per run, the same in every figure


@dataclass
class Line:
    """One curve of a panel."""

    label: str
    color: str
    steps: list[int]
    values: list[float]
    smooth: str = ""  # noisy per-step values: draw the raw curve faint under its "mean" or "median"
    marker: Optional[str] = None  # sparse points (eval) get markers


@dataclass
class Panel:
    """One set of axes."""

    title: str
    ylabel: str
    lines: list[Line]
    zero_line: bool = False
    number_format: str = ""  # "eng": tokens/s as 12.3k; "sci": learning rates as 2.00e-05


@dataclass
class Figure:
    """One PNG: its file stem, title and panels (the empty ones are dropped before drawing)."""

    name: str
    title: str
    panels: list[Panel]
    notes: list[str] = field(default_factory=list)  # why a run is missing from it, for stderr


def is_generic(source: dict[str, Any]) -> bool:
    """Whether a ``data.sources`` entry is generic replay data (trained to resist forgetting): ``generic``
    when set, else whether its format is plain ``text``.

    >>> [is_generic(s) for s in ({"format": "text"}, {"format": "text", "generic": False},
    ...                          {"format": "messages", "generic": True}, {"format": "alpaca"})]
    [True, False, True, False]
    """
    flag = source.get("generic")
    return bool(flag) if flag is not None else source.get("format", "messages") == "text"


def config_sources(config: Any) -> tuple[list[str], list[str]]:
    """The source names of a config.yaml and the generic ones among them ([] for what it does not say)."""
    data = config.get("data") if isinstance(config, dict) else None
    sources = data.get("sources") if isinstance(data, dict) else None
    entries = [s for s in sources if isinstance(s, dict) and "name" in s] if isinstance(sources, list) else []
    return [str(s["name"]) for s in entries], [str(s["name"]) for s in entries if is_generic(s)]


def run_labels(paths: list[Path]) -> list[str]:
    """Legend labels: the directories' names; where any two collide, every run's last two path components,
    so that the points of a sweep read alike (full paths where even those collide).

    >>> run_labels([Path("/s/a/0"), Path("/s/b/0"), Path("/s/a/1")]), run_labels([Path("/s/x"), Path("/y")])
    (['a/0', 'b/0', 'a/1'], ['x', 'y'])
    """
    resolved = [p.resolve() for p in paths]
    for labels in ([p.name for p in resolved], ["/".join(p.parts[-2:]) for p in resolved]):
        if len(set(labels)) == len(labels):
            return labels
    return [str(p) for p in resolved]


def read_run(path: Path, label: str, color: str) -> Run:
    """Read one run directory; notes on what was skipped go to stderr.

    Raises:
        PlotError: the directory or its metrics.jsonl is missing, unreadable or holds no rows.
    """
    if not path.is_dir():
        raise PlotError(f"run directory {path} {'is not a directory' if path.exists() else 'does not exist'}")
    metrics = path / "metrics.jsonl"
    try:
        rows, skipped = parse_metrics(metrics.read_text(errors="replace"))
    except FileNotFoundError:
        raise PlotError(f"no metrics.jsonl in {path}") from None
    except OSError as e:
        raise PlotError(f"{metrics} is unreadable ({e.strerror or type(e).__name__})") from None
    if not rows:
        raise PlotError(f"{metrics} has no readable rows")
    for note in skipped:
        print(f"sftdist-plot: {metrics}: {note}", file=sys.stderr)
    sources, generic = [], []
    if (path / "config.yaml").is_file():
        try:
            sources, generic = config_sources(read_yaml(path / "config.yaml"))
        except Exception as e:  # without it no source is known generic, which the forgetting title says
            print(f"sftdist-plot: {path / 'config.yaml'} unreadable ({type(e).__name__}); "
                  "no source is known to be generic", file=sys.stderr)
    return Run(label, path, rows, sources, generic, color)


def is_number(value: Any) -> bool:
    """A finite int or float (null, NaN and inf cannot be drawn; bools are not metrics)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def series(rows: list[dict[str, Any]], key: str, scale: float = 1.0) -> tuple[list[int], list[float]]:
    """The steps and values of one metric, over the rows where it is a finite number.

    >>> series([{"step": 0}, {"step": 1, "loss": 2.0}, {"step": 2, "loss": None}, {"step": 3, "loss": 1.5}],
    ...        "loss")
    ([1, 3], [2.0, 1.5])
    """
    points = [(row["step"], row[key] * scale) for row in rows if is_number(row.get(key))]
    return [s for s, _ in points], [v for _, v in points]


def source_names(runs: list[Run], prefix: str) -> list[str]:
    """The sources with a ``<prefix>/<source>`` key in any run: config order first, then first logged."""
    logged = {key[len(prefix) + 1:]: None for run in runs for row in run.rows for key in row
              if key.startswith(prefix + "/")}
    in_config = [s for run in runs for s in run.sources if s in logged]
    return list(dict.fromkeys([*in_config, *logged]))


def smoothing_window(points: int, requested: Optional[int] = None) -> int:
    """Smoothing window in steps: ``requested`` when given, else 1/12 of the curve (1 = no smoothing).

    >>> [smoothing_window(n) for n in (6, 60, 1000, 100000)], smoothing_window(60, 2)
    ([1, 5, 83, 200], 2)
    """
    if requested is not None:
        return max(1, requested)
    return min(MAX_SMOOTH_WINDOW, max(1, round(points * SMOOTH_SHARE)))


def centered_mean(values: list[float], window: int) -> list[float]:
    """Mean of each value and the ``window // 2`` on either side, as many on both sides (so fewer near the
    ends, and none at the first and last value). Centred and symmetric, so the smoothed loss neither lags
    behind its early fall, as a trailing average (an EMA) does, nor is pulled off it at the ends.

    >>> centered_mean([4.0, 2.0, 0.0, 2.0, 4.0], 3)
    [4.0, 2.0, 1.3333333333333333, 2.0, 4.0]
    """
    out = []
    for i in range(len(values)):
        half = min(window // 2, i, len(values) - 1 - i)
        out.append(statistics.fmean(values[i - half:i + half + 1]))
    return out


def rolling_median(values: list[float], window: int) -> list[float]:
    """Median of each value and the ``window - 1`` before it. Throughput is smoothed this way, not by an
    EMA, because a slow warm-up or resume step would otherwise drag the curve down for many steps after it.

    >>> rolling_median([9.0, 1.0, 1.0, 1.0, 5.0, 1.0], 3)
    [9.0, 5.0, 1.0, 1.0, 1.0, 1.0]
    """
    return [statistics.median(values[max(0, i + 1 - window):i + 1]) for i in range(len(values))]


SMOOTHERS = {"mean": centered_mean, "median": rolling_median}


def key_panel(runs: list[Run], key: str, title: str, ylabel: str, *, scale: float = 1.0,
              number_format: str = "", **style: Any) -> Panel:
    """One panel of one metric, one line per run that logged it (``style``: Line's smooth and marker)."""
    lines = [Line(run.label, run.color, *series(run.rows, key, scale), **style) for run in runs]
    return Panel(title, ylabel, [line for line in lines if line.steps], number_format=number_format)


def loss_figure(runs: list[Run]) -> Figure:
    panels = [key_panel(runs, "loss", "train loss (all sources)", LOSS_LABEL, smooth="mean")]
    panels += [key_panel(runs, f"loss/{s}", f"train loss: {s}", LOSS_LABEL, smooth="mean")
               for s in source_names(runs, "loss")]
    return Figure("loss", "Train loss per step (faint: raw; bold: centred moving average)", panels)


def eval_loss_figure(runs: list[Run]) -> Figure:
    panels = [key_panel(runs, "eval_loss", "eval loss (all sources)", LOSS_LABEL, marker="o")]
    panels += [key_panel(runs, f"eval_loss/{s}", f"eval loss: {s}", LOSS_LABEL, marker="o")
               for s in source_names(runs, "eval_loss")]
    return Figure("eval_loss", "Eval loss (step 0: before training)", panels)


def eval_loss_delta(run: Run, source: str) -> tuple[list[int], list[float]]:
    """A source's eval loss minus its step-0 value: the logged ``eval_loss_delta/<source>``, else computed
    from ``eval_loss/<source>`` where the run has a step-0 baseline ([] without one, as older runs)."""
    loss_key, delta_key = f"eval_loss/{source}", f"eval_loss_delta/{source}"
    base = next((r[loss_key] for r in run.rows if r["step"] == 0 and is_number(r.get(loss_key))), None)
    points = [(r["step"], r[delta_key] if is_number(r.get(delta_key)) else r[loss_key] - base)
              for r in run.rows if is_number(r.get(delta_key))
              or (base is not None and is_number(r.get(loss_key)))]
    return [s for s, _ in points], [v for _, v in points]


def probe_panels(runs: list[Run]) -> list[Panel]:
    """The forgetting probe's two curves (``forgetting/answer_agreement``, ``forgetting/kl``), where logged."""
    panels = [key_panel(runs, "forgetting/answer_agreement", "probe answers that match the base model's",
                        "share of probe answers", marker="o"),
              key_panel(runs, "forgetting/kl", "probe drift: KL(base || tuned) per answer token", "nats",
                        marker="o")]
    return [panel for panel in panels if panel.lines]


def forgetting_figure(runs: list[Run]) -> Figure:
    """The forgetting probe's drift from the base model, then each run's generic sources' eval-loss change
    since step 0; every evaluated source's where none of a run's sources is generic (the title and panel
    titles say which)."""
    chosen = {run.label: run.generic or source_names([run], "eval_loss") for run in runs}
    panels = probe_panels(runs)
    probed = bool(panels)
    for source in dict.fromkeys(s for run in runs for s in chosen[run.label]):
        lines = [Line(run.label, run.color, *eval_loss_delta(run, source), marker="o")
                 for run in runs if source in chosen[run.label]]
        generic = " (generic)" if any(source in run.generic for run in runs) else ""
        panels.append(Panel(f"{source}{generic}", "eval loss - step-0 eval loss (nats/token)",
                            [line for line in lines if line.steps], zero_line=True))
    plotted = [run for run in runs if any(line.label == run.label for p in panels for line in p.lines)]
    notes = [f"{run.label}: no forgetting curve (no step-0 eval of {', '.join(chosen[run.label])})"
             if chosen[run.label] else f"{run.label}: no forgetting curve (no per-source eval loss)"
             for run in runs if run not in plotted]
    if probed:
        title = "Forgetting: drift from the base model on the probe prompts, and eval loss change since step 0"
    elif plotted and all(run.generic for run in plotted):
        title = "Forgetting: generic sources' eval loss change since step 0 (above 0: forgotten)"
    elif any(run.generic for run in plotted):
        title = "Eval loss change since step 0: generic sources (all sources for runs with none generic)"
    else:
        title = "Eval loss change since step 0, all sources (no source is marked generic)"
    return Figure("forgetting", title, panels, notes)


def lr_figure(runs: list[Run]) -> Figure:
    return Figure("lr", "Learning rate", [key_panel(runs, "lr", "", "learning rate", number_format="sci")])


def throughput_figure(runs: list[Run]) -> Figure:
    panels = [key_panel(runs, "tokens_per_sec", "tokens/s (non-padding)", "tokens/s", smooth="median",
                        number_format="eng"),
              key_panel(runs, "supervised_tokens_per_sec", "supervised tokens/s", "supervised tokens/s",
                        smooth="median", number_format="eng"),
              key_panel(runs, "step_time_s", "step time", "seconds per optimizer step", smooth="median")]
    return Figure("throughput", "Throughput (faint: raw; bold: rolling median)", panels)


def mfu_figure(runs: list[Run]) -> Figure:
    # step_metrics.py logs mfu as a fraction of the peak FLOP/s
    panel = key_panel(runs, "mfu", "", "MFU (% of peak)", scale=100.0, smooth="median")
    return Figure("mfu", "Model FLOPs utilisation (faint: raw; bold: rolling median)", [panel])


def memory_figure(runs: list[Run]) -> Figure:
    keys = dict.fromkeys(k for run in runs for row in run.rows for k in row if k.startswith("mem/"))
    panels = [key_panel(runs, key, key, "GiB" if key.endswith("_gib") else key) for key in keys]
    return Figure("memory", "Memory", panels)


FIGURES: tuple[Callable[[list[Run]], Figure], ...] = (
    loss_figure, eval_loss_figure, forgetting_figure, lr_figure, throughput_figure, mfu_figure, memory_figure)


def draw(figure: Figure, path: Path, smooth_window: Optional[int] = None) -> None:
    """Write one figure as a PNG: its panels in a grid, one legend of the runs below them."""
    import matplotlib

    matplotlib.use("Agg")  # no display on login nodes
    import matplotlib.pyplot as plt
    from matplotlib.ticker import EngFormatter, FuncFormatter

    columns = min(PANEL_COLUMNS, len(figure.panels))
    rows = math.ceil(len(figure.panels) / columns)
    width = max(7.0, 5.2 * columns)
    fig, axes = plt.subplots(rows, columns, figsize=(width, 3.6 * rows + 0.9), squeeze=False,
                             sharex=True, layout="constrained")
    legend: dict[str, Any] = {}
    for ax, panel in zip(axes.flat, figure.panels):
        for line in panel.lines:
            window = smoothing_window(len(line.values), smooth_window) if line.smooth else 1
            if window > 1:
                ax.plot(line.steps, line.values, color=line.color, alpha=0.25, linewidth=0.8)
                values = SMOOTHERS[line.smooth](line.values, window)
            else:
                values = line.values
            (handle,) = ax.plot(line.steps, values, color=line.color, linewidth=1.6, marker=line.marker,
                                markersize=4)
            legend.setdefault(line.label, handle)
        if panel.zero_line:
            ax.axhline(0.0, color="0.4", linewidth=0.9, linestyle="--")
        if panel.number_format:
            ax.yaxis.set_major_formatter(EngFormatter(sep="") if panel.number_format == "eng"
                                         else FuncFormatter(lambda value, _: f"{value:.2e}"))
        ax.set(title=panel.title, ylabel=panel.ylabel)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(figure.panels):]:
        ax.set_visible(False)
    # shared x axes show ticks on the bottom row only; a panel above an empty slot is a bottom one too
    for ax in axes.flat[max(0, len(figure.panels) - columns):len(figure.panels)]:
        ax.set_xlabel(STEP_LABEL)
        ax.xaxis.set_tick_params(labelbottom=True)
    fig.suptitle(textwrap.fill(figure.title, width=round(width * 11)))  # ~11 characters an inch
    fig.legend(list(legend.values()), list(legend), loc="outside lower center",
               ncols=min(len(legend), 4), title="run", fontsize="small")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Optional[list[str]] = None) -> int:
    """Write the figures of the runs and print their paths.

    Returns:
        0 when at least one PNG was written; 2 when a run directory or its metrics.jsonl is missing or
        empty, matplotlib is not installed, or no run logged anything to draw.
    """
    parser = argparse.ArgumentParser(prog="sftdist-plot", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 2)[2].rsplit("\n\n", 1)[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR",
                        help="a run directory holding metrics.jsonl (and config.yaml)")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for the PNGs (default: RUN_DIR/plots for one run, ./plots for several)")
    parser.add_argument("--smooth", type=int, default=None, metavar="STEPS",
                        help="smoothing window in steps for per-step curves (1: off; default: 1/12 of the "
                             f"steps, at most {MAX_SMOOTH_WINDOW})")
    args = parser.parse_args(argv)
    run_dirs = list(dict.fromkeys(args.run_dirs))
    try:
        runs = [read_run(path, label, f"C{index % 10}")
                for index, (path, label) in enumerate(zip(run_dirs, run_labels(run_dirs)))]
    except PlotError as e:
        print(f"sftdist-plot: {e}", file=sys.stderr)
        return 2
    if importlib.util.find_spec("matplotlib") is None:  # checked before anything is written
        print("sftdist-plot: matplotlib is not installed; pip install matplotlib", file=sys.stderr)
        return 2
    # no run directory owns an overlay of several, so it goes to the working directory
    out = args.out or (run_dirs[0] / "plots" if len(run_dirs) == 1 else DEFAULT_MULTI_RUN_OUT)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for build in FIGURES:
        figure = build(runs)
        figure.panels = [panel for panel in figure.panels if panel.lines]
        for note in figure.notes:
            print(f"sftdist-plot: {figure.name}.png: {note}", file=sys.stderr)
        if not figure.panels:
            print(f"sftdist-plot: skipped {figure.name}.png (no run logged what it shows)", file=sys.stderr)
            continue
        draw(figure, out / f"{figure.name}.png", args.smooth)
        written.append(out / f"{figure.name}.png")
    if not written:
        print("sftdist-plot: nothing to draw (no run logged any plotted metric)", file=sys.stderr)
        return 2
    print("wrote:\n" + "\n".join(f"  {path}" for path in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
