"""sftdist-plot on synthetic run directories: the PNGs, the series each figure picks, generic sources, labels,
and the errors for bad inputs."""

from __future__ import annotations

import doctest
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import sftdist.tools.plot as plot
from sftdist.tools.plot import (
    Run,
    config_sources,
    eval_loss_delta,
    forgetting_figure,
    is_generic,
    main,
    read_run,
    run_labels,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ALL_FIGURES = {"loss", "eval_loss", "forgetting", "lr", "throughput", "mfu", "memory"}
# The figures an old-style run (no step 0, mfu, supervised tokens/s, deltas) still gets.
OLD_STYLE_FIGURES = {"loss", "eval_loss", "lr", "throughput", "memory"}
SOURCES = [{"name": "chat", "format": "messages", "generic": None},
           {"name": "web", "format": "text", "generic": None}]


def metric_rows(steps: int = 60, *, eval_every: int = 10, lr: float = 2e-5, new_keys: bool = True,
                seed: int = 0) -> list[dict]:
    """Rows as training writes them: the chat loss falls with noise; the generic (web) eval loss rises a
    little; both faster for a larger lr. Old-style rows (``new_keys=False``) lack the step-0 baseline, mfu,
    supervised tokens/s, step time and the eval-loss deltas."""
    rng = random.Random(seed)
    warmup, speed = 6, (lr / 2e-5) ** 0.5
    eval_chat, eval_web = (lambda s: 1.2 + 1.0 * 0.95 ** (speed * s)), (lambda s: 2.9 + 0.004 * speed * s)

    def evaluate(step: int) -> dict:
        row = {"eval_loss": 0.7 * eval_chat(step) + 0.3 * eval_web(step), "eval_loss/chat": eval_chat(step),
               "eval_loss/web": eval_web(step), "eval_supervised_tokens/chat": 7000,
               "eval_supervised_tokens/web": 3000}
        if new_keys:
            row |= {"eval_loss_delta": row["eval_loss"] - (0.7 * eval_chat(0) + 0.3 * eval_web(0)),
                    "eval_loss_delta/chat": eval_chat(step) - eval_chat(0),
                    "eval_loss_delta/web": eval_web(step) - eval_web(0)}
        return row

    rows = [{"step": 0, "elapsed_s": 4.0, **evaluate(0)}] if new_keys else []
    for step in range(1, steps + 1):
        chat = 1.1 + 1.1 * 0.94 ** (speed * step) + rng.gauss(0, 0.08)
        web = 2.9 + 0.004 * speed * step + rng.gauss(0, 0.05)
        step_time = (3.0 if step == 1 else 0.5) * (1 + rng.gauss(0, 0.05))
        tokens, supervised = 32768, rng.randint(9000, 11000)
        row = {"step": step, "loss": 0.7 * chat + 0.3 * web,
               "lr": lr * min(1.0, step / warmup) * (0.5 + 0.5 * (steps - step) / steps),
               "grad_norm": 1.5 * 0.97 ** step + 0.3, "tokens": tokens, "supervised_tokens": supervised,
               "tokens_per_sec": tokens / step_time, "elapsed_s": 4.0 + 0.5 * step,
               "padding_fraction": 0.05, "mem/host_rss_gib": 6.0 + 0.01 * step,
               "loss/chat": chat, "loss/web": None if step % 7 == 0 else web,  # web had no tokens that step
               "supervised_tokens/chat": supervised - 3000, "supervised_tokens/web": 3000}
        if new_keys:
            row |= {"supervised_tokens_per_sec": supervised / step_time, "step_time_s": step_time,
                    "mfu": None if step == 1 else 0.42 + rng.gauss(0, 0.01), "mem/device_allocated_gib": 21.5}
        if step % eval_every == 0 or step == steps:
            row |= evaluate(step)
        rows.append(row)
    return rows


def write_run(directory: Path, rows: list[dict], sources: list[dict] | None = SOURCES,
              tail: str = "") -> Path:
    """A run directory: metrics.jsonl (plus ``tail``, e.g. a truncated line) and, unless sources is None,
    config.yaml as OmegaConf writes it."""
    directory.mkdir(parents=True)
    (directory / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)
    if sources is not None:
        config = {"run_name": directory.name, "data": {"sources": sources}, "train": {"max_steps": 60}}
        OmegaConf.save(OmegaConf.create(config), directory / "config.yaml")
    return directory


@pytest.fixture
def two_runs(tmp_path) -> list[Path]:
    """A new-style run (step-0 baseline, generic web source) and an old-style one of a sweep."""
    return [write_run(tmp_path / "sweep" / "lr2e-5", metric_rows()),
            write_run(tmp_path / "sweep" / "lr1e-4-old", metric_rows(lr=1e-4, new_keys=False, seed=1))]


def load(paths: list[Path]) -> list[Run]:
    return [read_run(p, label, f"C{i}") for i, (p, label) in enumerate(zip(paths, run_labels(paths)))]


def assert_valid_png(path: Path) -> None:
    data = path.read_bytes()
    assert len(data) > 1000 and data[:8] == PNG_MAGIC, path
    import matplotlib.image
    import numpy as np

    image = matplotlib.image.imread(path)
    assert image.shape[0] > 100 and image.shape[1] > 100
    assert len(np.unique(image.reshape(-1, image.shape[-1]), axis=0)) > 10, f"{path} is one flat colour"


def test_two_runs_write_every_figure_as_a_valid_png(two_runs, tmp_path, capsys):
    out = tmp_path / "figures"
    assert main([*map(str, two_runs), "--out", str(out)]) == 0
    assert {p.stem for p in out.glob("*.png")} == ALL_FIGURES
    for png in out.glob("*.png"):
        assert_valid_png(png)
    printed = capsys.readouterr().out
    assert all(str(out / f"{name}.png") in printed for name in ALL_FIGURES)


def test_one_run_writes_into_its_plots_folder(two_runs, capsys):
    assert main([str(two_runs[0])]) == 0
    assert {p.stem for p in (two_runs[0] / "plots").glob("*.png")} == ALL_FIGURES


def test_several_runs_default_to_plots_in_the_working_directory(two_runs, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(list(map(str, two_runs))) == 0
    assert {p.stem for p in (tmp_path / "plots").glob("*.png")} == ALL_FIGURES
    assert not (two_runs[0] / "plots").exists()


def test_an_old_style_run_skips_what_it_never_logged_and_says_so(two_runs, capsys):
    assert main([str(two_runs[1])]) == 0
    assert {p.stem for p in (two_runs[1] / "plots").glob("*.png")} == OLD_STYLE_FIGURES
    err = capsys.readouterr().err
    assert "skipped mfu.png" in err and "skipped forgetting.png" in err
    assert "lr1e-4-old: no forgetting curve (no step-0 eval of web)" in err


def test_overlay_figures_have_one_line_per_run(two_runs):
    runs = load(two_runs)
    labels = ["lr2e-5", "lr1e-4-old"]
    loss = plot.loss_figure(runs)
    assert [p.title for p in loss.panels] == [
        "train loss (all sources)", "train loss: chat", "train loss: web"]
    for panel in loss.panels:
        assert [line.label for line in panel.lines] == labels and all(line.smooth for line in panel.lines)
    assert [line.label for line in plot.lr_figure(runs).panels[0].lines] == labels
    # step 0 carries eval keys only: it is on the eval figure, not the train loss one
    assert loss.panels[0].lines[0].steps[0] == 1
    eval_lines = plot.eval_loss_figure(runs).panels[0].lines
    assert [line.label for line in eval_lines] == labels
    assert eval_lines[0].steps == [0, 10, 20, 30, 40, 50, 60] and eval_lines[1].steps[0] == 10
    throughput = {p.title: [line.label for line in p.lines] for p in plot.throughput_figure(runs).panels}
    assert throughput["tokens/s (non-padding)"] == labels
    assert throughput["supervised tokens/s"] == ["lr2e-5"]  # the old run never logged it
    mfu = plot.mfu_figure(runs).panels[0].lines
    assert [line.label for line in mfu] == ["lr2e-5"] and 40 < mfu[0].values[0] < 45  # percent, null skipped


def test_null_per_source_loss_is_left_out_not_drawn_as_zero(two_runs):
    web = next(p for p in plot.loss_figure(load(two_runs)).panels if p.title == "train loss: web")
    assert 7 not in web.lines[0].steps and 6 in web.lines[0].steps and None not in web.lines[0].values


def test_forgetting_shows_the_generic_source_only(two_runs, capsys):
    figure = forgetting_figure(load(two_runs))
    assert [p.title for p in figure.panels] == ["web (generic)"]  # chat is not generic
    (line,) = figure.panels[0].lines  # the old run has no step-0 baseline
    assert line.label == "lr2e-5" and line.steps == [0, 10, 20, 30, 40, 50, 60]
    assert line.values[0] == 0.0 and line.values[-1] == pytest.approx(0.004 * 60)
    assert figure.panels[0].zero_line and figure.title.startswith("Forgetting: generic sources")
    assert figure.notes == ["lr1e-4-old: no forgetting curve (no step-0 eval of web)"]


def test_forgetting_leads_with_the_probe_drift_when_logged(tmp_path, capsys):
    rows = metric_rows()
    for r in rows:
        if "eval_loss" in r:  # agreement falls from 1 as the KL rises
            r |= {"forgetting/kl": 0.01 * r["step"], "forgetting/answer_agreement": 1 - r["step"] / 120}
    (run,) = load([write_run(tmp_path / "probed", rows)])
    figure = forgetting_figure([run])
    assert [p.title for p in figure.panels][:2] == ["probe answers that match the base model's",
                                                    "probe drift: KL(base || tuned) per answer token"]
    agreement = figure.panels[0].lines[0]
    assert agreement.steps == [0, 10, 20, 30, 40, 50, 60] and agreement.values[-1] == pytest.approx(0.5)
    assert figure.title.startswith("Forgetting: drift from the base model")
    plot.main([str(tmp_path / "probed")])
    assert_valid_png(tmp_path / "probed" / "plots" / "forgetting.png")


def test_forgetting_delta_is_computed_from_the_step_0_baseline_when_not_logged(tmp_path):
    rows = [{k: v for k, v in r.items() if "delta" not in k} for r in metric_rows()]
    (run,) = load([write_run(tmp_path / "no_deltas", rows)])
    steps, deltas = eval_loss_delta(run, "web")
    assert steps == [0, 10, 20, 30, 40, 50, 60]
    assert deltas == pytest.approx([0.004 * s for s in steps])


def test_forgetting_without_a_generic_source_shows_every_source(tmp_path):
    sources = [{"name": "chat", "format": "messages"}, {"name": "web", "format": "text", "generic": False}]
    (run,) = load([write_run(tmp_path / "a", metric_rows(), sources=sources)])
    figure = forgetting_figure([run])
    assert [p.title for p in figure.panels] == ["chat", "web"]
    assert "no source is marked generic" in figure.title


def test_without_config_yaml_no_source_is_generic(tmp_path):
    (run,) = load([write_run(tmp_path / "a", metric_rows(), sources=None)])
    assert run.generic == [] and [p.title for p in forgetting_figure([run]).panels] == ["chat", "web"]


def test_generic_rule():
    assert is_generic({"name": "web", "format": "text"})
    assert is_generic({"name": "web", "format": "text", "generic": None})
    assert not is_generic({"name": "web", "format": "text", "generic": False})
    assert is_generic({"name": "chat", "format": "messages", "generic": True})
    assert not is_generic({"name": "chat", "format": "sharegpt"})
    config = {"data": {"sources": [{"name": "a", "format": "text", "generic": False},
                                   {"name": "b", "format": "messages", "generic": True},
                                   {"name": "c", "format": "text"}, {"name": "d", "format": "alpaca"}]}}
    assert config_sources(config) == (["a", "b", "c", "d"], ["b", "c"])
    assert config_sources({}) == ([], []) and config_sources(None) == ([], [])


@pytest.mark.parametrize("generic", [None, True, False])
@pytest.mark.parametrize("fmt", ["messages", "sharegpt", "alpaca", "prompt_completion", "text"])
def test_generic_rule_matches_the_trainers(fmt, generic):
    # config.yaml is read as plain YAML here (no schema validation), so the rule is restated, not imported
    from sftdist.config import DataSource

    source = DataSource(name="s", path="p", format=fmt, generic=generic)
    assert is_generic({"name": "s", "format": fmt, "generic": generic}) == source.is_generic


def test_labels_are_directory_names_or_the_last_two_components_where_they_collide(tmp_path):
    paths = [tmp_path / "lr" / "0", tmp_path / "wd" / "0", tmp_path / "lr" / "1"]
    assert run_labels(paths) == ["lr/0", "wd/0", "lr/1"]
    assert run_labels(paths[1:]) == ["0", "1"]
    assert run_labels([tmp_path / "x" / "a" / "0", tmp_path / "y" / "a" / "0"]) == [
        str(tmp_path / "x" / "a" / "0"), str(tmp_path / "y" / "a" / "0")]


def test_colliding_names_label_the_legend_by_their_parent(tmp_path, capsys):
    paths = [write_run(tmp_path / name / "0", metric_rows(seed=i)) for i, name in enumerate(("lr", "wd"))]
    assert [line.label for line in plot.lr_figure(load(paths)).panels[0].lines] == ["lr/0", "wd/0"]


@pytest.mark.parametrize("case", ["missing_dir", "no_metrics", "empty_metrics", "a_file"])
def test_bad_inputs_exit_2_naming_the_path(case, two_runs, tmp_path, capsys):
    bad = tmp_path / case
    if case == "no_metrics":
        bad.mkdir()
        (bad / "config.yaml").write_text("data: {}\n")
    elif case == "empty_metrics":
        bad.mkdir()
        (bad / "metrics.jsonl").write_text('{"step": 1, "lo')
    elif case == "a_file":
        bad.write_text("not a directory")
    out = tmp_path / "figures"
    assert main([str(two_runs[0]), str(bad), "--out", str(out)]) == 2
    assert str(bad) in capsys.readouterr().err
    assert not out.exists()  # nothing is written for a comparison with a run missing


def test_a_truncated_last_line_is_tolerated(tmp_path, capsys):
    run = write_run(tmp_path / "killed", metric_rows(30), tail='{"step": 31, "loss": 1.2, "lr"')
    assert main([str(run)]) == 0
    assert "truncated last line" in capsys.readouterr().err
    assert_valid_png(run / "plots" / "loss.png")
    assert plot.loss_figure(load([run])).panels[0].lines[0].steps[-1] == 30


def test_smoothing_removes_noise_without_lagging_a_falling_loss():
    noisy = [2.0 + (0.5 if i % 2 else -0.5) for i in range(200)]
    smoothed = plot.centered_mean(noisy, 20)
    assert max(smoothed[50:150]) - min(smoothed[50:150]) < 0.1 and smoothed[100] == pytest.approx(2.0, abs=0.05)
    assert plot.centered_mean([1.0, 3.0], 1) == [1.0, 3.0]  # window 1: no smoothing
    falling = [10.0 - 0.05 * i for i in range(200)]  # a straight fall: a centred mean stays on it
    assert plot.centered_mean(falling, 21)[100] == pytest.approx(falling[100])


def imported_modules(*args: str) -> tuple[set[str], str]:
    """The top-level modules ``python -X importtime ARGS`` imports, and its stdout; it must exit 0."""
    result = subprocess.run([sys.executable, "-X", "importtime", *args], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    timings = (line.rpartition("|")[2].strip() for line in result.stderr.splitlines()
               if line.startswith("import time:"))
    return {name.split(".")[0] for name in timings}, result.stdout


def test_cli_runs_as_a_module_without_the_training_stack(two_runs, tmp_path):
    out = tmp_path / "cli"
    modules, stdout = imported_modules("-m", "sftdist.tools.plot", *map(str, two_runs), "--out", str(out))
    assert str(out / "forgetting.png") in stdout
    assert "matplotlib" in modules and not {"torch", "deepspeed", "transformers"} & modules
    usage = subprocess.run([sys.executable, "-m", "sftdist.tools.plot", "--help"], capture_output=True, text=True,
                           timeout=60)
    assert usage.returncode == 0 and "RUN_DIR/plots" in usage.stdout and "forgetting.png" in usage.stdout


def test_importing_the_plotter_leaves_matplotlib_until_it_draws():
    modules, _ = imported_modules("-c", "import sftdist.tools.plot")
    assert "sftdist" in modules and "matplotlib" not in modules


def test_docstring_examples():
    result = doctest.testmod(plot)
    assert result.attempted > 0 and result.failed == 0
