"""sftdist-sweep-report on synthetic Hydra multirun directories: table, CSV, plot, best point, errors."""

from __future__ import annotations

import csv
import doctest
import json
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import sftdist.tools.sweep_report as sweep_report
from sftdist.tools.sweep_report import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MAX_STEPS = 10


def metric_rows(steps: int, *, lr: float, evals: dict[int, float], elapsed: list[float] | None = None):
    """Rows as training writes them; the train loss falls faster for a larger lr."""
    elapsed = elapsed or [2.0 * s for s in range(1, steps + 1)]
    rows = []
    for s in range(1, steps + 1):
        row = {"step": s, "loss": 3.0 - lr * 1e3 * s, "lr": lr, "tokens": 512,
               "tokens_per_sec": 1000.0 + 10 * s, "elapsed_s": elapsed[s - 1], "loss/demo": 3.0}
        if s in evals:  # a larger lr forgets more: fewer probe answers kept, more drift
            row |= {"eval_loss": evals[s], "eval_loss/demo": evals[s],
                    "forgetting/answer_agreement": 1 - lr * 1e3 * s / 10, "forgetting/kl": lr * 1e3 * s}
        rows.append(row)
    return rows


def write_point(sweep: Path, name: str, *, lr: float, rows=None, final=False, tail="", overrides=None,
                seed=0) -> Path:
    """One run directory: config.yaml always; metrics.jsonl, final/, checkpoints/ and .hydra as asked."""
    point = sweep / name
    point.mkdir(parents=True)
    config = {"output_dir": str(point), "run_name": f"point-{name}",
              "train": {"lr": lr, "max_steps": MAX_STEPS, "seed": seed},
              "peft": {"method": "none"}, "logging": {"wandb_group": sweep.name, "log_every": 1}}
    OmegaConf.save(OmegaConf.create(config), point / "config.yaml")
    if rows is not None:
        (point / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)
    if final:
        (point / "final").mkdir()
    elif rows:
        (point / "checkpoints").mkdir()
        (point / "checkpoints" / "latest").write_text(f"step-{rows[-1]['step']}")
    if overrides is not None:
        (point / ".hydra").mkdir()
        (point / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    return point


LRS = {"0": 1e-5, "1": 2e-5, "2": 5e-5, "3": 1e-4, "4": 2e-4, "5": 3e-4}
EVALS = {"0": {5: 2.0, 10: 1.5}, "1": {5: 1.8, 10: 1.2}, "2": {5: 1.0, 10: 1.3}, "3": {5: 1.25}}
# point 0 was resumed after step 5: elapsed_s restarts with each process
RESUMED_ELAPSED = [2.0, 4.0, 6.0, 8.0, 10.0, 1.0, 3.0, 5.0, 7.0, 9.0]


@pytest.fixture
def sweep(tmp_path) -> Path:
    """0-2 finished with eval (1 has the lowest final eval loss, 2 the lowest eval loss at any step),
    3 unfinished, 4 failed without metrics (a submitit error log), 5 killed mid-write of its last line."""
    root = tmp_path / "multirun" / "2025-01-01" / "12-00-00"
    write_point(root, "0", lr=LRS["0"], final=True,
                rows=metric_rows(10, lr=LRS["0"], evals=EVALS["0"], elapsed=RESUMED_ELAPSED))
    write_point(root, "1", lr=LRS["1"], final=True, rows=metric_rows(10, lr=LRS["1"], evals=EVALS["1"]))
    p2 = write_point(root, "2", lr=LRS["2"], final=True, rows=metric_rows(10, lr=LRS["2"], evals=EVALS["2"]))
    lines = (p2 / "metrics.jsonl").read_text().splitlines(keepends=True)
    (p2 / "metrics.jsonl").write_text("".join(lines[:3] + ["garbage{\n"] + lines[3:]))
    write_point(root, "3", lr=LRS["3"], rows=metric_rows(6, lr=LRS["3"], evals=EVALS["3"]))
    write_point(root, "4", lr=LRS["4"])
    err = root / ".submitit" / "4242_4" / "4242_4_0_log.err"
    err.parent.mkdir(parents=True)
    err.write_text("Traceback (most recent call last):\n  ...\ntorch.OutOfMemoryError: CUDA out of memory\n")
    write_point(root, "5", lr=LRS["5"], rows=metric_rows(8, lr=LRS["5"], evals={}), tail='{"step": 9, "lo')
    return root


def read_csv(sweep: Path) -> dict[str, dict[str, str]]:
    with open(sweep / "sweep_report.csv", newline="") as f:
        return {row["point"]: row for row in csv.DictReader(f)}


def best_line(out: str) -> str:
    return next(line for line in out.splitlines() if line.startswith("best point:"))


def test_csv_has_one_row_per_point_with_the_swept_value_and_the_numbers(sweep, capsys):
    assert main([str(sweep)]) == 0
    rows = read_csv(sweep)
    assert list(rows) == ["0", "1", "2", "3", "4", "5"]
    header = list(rows["0"])
    assert "train.lr" in header
    per_run_or_constant = ("output_dir", "run_name", "logging.wandb_group", "train.max_steps", "train.seed")
    assert not set(per_run_or_constant) & set(header)
    assert {p: float(r["train.lr"]) for p, r in rows.items()} == LRS
    assert {p: r["status"] for p, r in rows.items()} == {"0": "finished", "1": "finished", "2": "finished",
                                                         "3": "unfinished", "4": "failed", "5": "unfinished"}
    assert {p: r["steps_done"] for p, r in rows.items()} == {
        "0": "10", "1": "10", "2": "10", "3": "6", "4": "", "5": "8"}
    assert rows["3"]["max_steps"] == str(MAX_STEPS)
    for p in ("0", "1", "2", "3", "5"):
        expected = metric_rows(int(rows[p]["steps_done"]), lr=LRS[p], evals={})
        assert float(rows[p]["final_train_loss"]) == pytest.approx(expected[-1]["loss"])
        speeds = [r["tokens_per_sec"] for r in expected]
        assert float(rows[p]["mean_tokens_per_sec"]) == pytest.approx(sum(speeds) / len(speeds))
    for p, evals in EVALS.items():
        best_step = min(evals, key=evals.get)
        assert float(rows[p]["best_eval_loss"]) == pytest.approx(evals[best_step])
        assert int(rows[p]["best_eval_step"]) == best_step
        assert float(rows[p]["final_eval_loss"]) == pytest.approx(evals[max(evals)])
        assert float(rows[p]["final_answer_agreement"]) == pytest.approx(1 - LRS[p] * 1e3 * max(evals) / 10)
        assert float(rows[p]["final_forgetting_kl"]) == pytest.approx(LRS[p] * 1e3 * max(evals))
    assert rows["5"]["best_eval_loss"] == rows["5"]["final_eval_loss"] == rows["5"]["final_answer_agreement"] == ""
    assert float(rows["0"]["wall_time_s"]) == pytest.approx(RESUMED_ELAPSED[4] + RESUMED_ELAPSED[-1])
    assert float(rows["1"]["wall_time_s"]) == pytest.approx(2.0 * 10)


def test_notes_name_why_a_point_failed_and_what_was_skipped(sweep, capsys):
    assert main([str(sweep)]) == 0
    rows = read_csv(sweep)
    assert "no metrics.jsonl" in rows["4"]["note"]
    assert "CUDA out of memory" in rows["4"]["note"]
    assert "truncated last line" in rows["5"]["note"]
    assert "corrupt" in rows["2"]["note"] and "line 4" in rows["2"]["note"]
    assert "step-6" in rows["3"]["note"]
    assert rows["1"]["note"] == ""


def test_markdown_table_is_written_and_printed(sweep, capsys):
    assert main([str(sweep)]) == 0
    out = capsys.readouterr().out
    md = (sweep / "sweep_report.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("|")]
    assert len(table) == 2 + len(LRS)
    header = [c.strip() for c in table[0].strip("|").split("|")]
    assert header[:3] == ["point", "train.lr", "status"]
    assert any("last step" in h for h in header) and "probe answers kept (forgetting)" in header
    cells = {c[0]: c for c in ([x.strip() for x in line.strip("|").split("|")] for line in table[2:])}
    assert cells["3"][2] == "unfinished" and f"6/{MAX_STEPS}" in cells["3"]
    assert cells["4"][2] == "failed"
    assert f"{EVALS['2'][5]:.4f} (step 5)" in cells["2"]
    assert f"{EVALS['2'][10]:.4f} (step 10)" in cells["2"]
    for line in table:
        assert line in out
    assert best_line(out) in md


def test_best_point_is_the_lowest_final_eval_loss(sweep, capsys):
    assert main([str(sweep)]) == 0
    line = best_line(capsys.readouterr().out)
    # point 2 reached the lowest eval loss (at step 5) but ended higher than point 1
    assert line.startswith("best point: 1 (") and "train.lr=2e-05" in line
    assert f"{EVALS['1'][10]:.4f}" in line and "UNFINISHED" not in line


def test_an_unfinished_point_can_be_best_and_is_marked(tmp_path, capsys):
    write_point(tmp_path, "0", lr=1e-5, final=True, rows=metric_rows(10, lr=1e-5, evals={10: 1.5}))
    write_point(tmp_path, "1", lr=2e-5, rows=metric_rows(4, lr=2e-5, evals={4: 1.1}))
    assert main([str(tmp_path)]) == 0
    line = best_line(capsys.readouterr().out)
    assert line.startswith("best point: 1 (") and "UNFINISHED" in line and f"4/{MAX_STEPS}" in line


def test_without_eval_the_best_point_is_the_lowest_final_train_loss(tmp_path, capsys):
    for name, lr in (("0", 1e-5), ("1", 3e-5), ("2", 2e-5)):
        write_point(tmp_path, name, lr=lr, final=True, rows=metric_rows(10, lr=lr, evals={}))
    write_point(tmp_path, "3", lr=9e-5, rows=[], tail="not json at all\n")
    assert main([str(tmp_path)]) == 0
    line = best_line(capsys.readouterr().out)
    assert line.startswith("best point: 1 (") and "final train loss" in line
    assert f"{metric_rows(10, lr=3e-5, evals={})[-1]['loss']:.4f}" in line
    assert read_csv(tmp_path)["3"]["status"] == "failed"
    assert "no readable rows" in read_csv(tmp_path)["3"]["note"]


def test_a_failed_point_is_never_best():
    rows = [{"point": "ok", "status": "unfinished", "final_eval_loss": 2.0, "final_train_loss": 2.0},
            {"point": "bad", "status": "failed", "final_eval_loss": 0.1, "final_train_loss": 0.1}]
    best, metric = sweep_report.best_row(rows)
    assert best["point"] == "ok" and metric == "final_eval_loss"
    assert sweep_report.best_row(rows[1:]) is None


def test_png_is_a_valid_image(sweep, capsys):
    assert main([str(sweep)]) == 0
    png = sweep / "sweep_report.png"
    data = png.read_bytes()
    assert len(data) > 1000 and data[:8] == PNG_MAGIC
    import matplotlib.image

    height, width = matplotlib.image.imread(png).shape[:2]
    assert width > height > 0  # two panels side by side


def test_hydra_overrides_are_preferred_to_config_differences(tmp_path, capsys):
    # the seeds differ too, but Hydra's overrides say what the sweep varied; model=tiny is shared
    for name, lr in (("0", 1e-5), ("1", 2e-5)):
        write_point(tmp_path, name, lr=lr, seed=int(name), rows=metric_rows(3, lr=lr, evals={}), final=True,
                    overrides=[f"train.lr={lr:g}", "model=tiny"])
    assert main([str(tmp_path)]) == 0
    rows = read_csv(tmp_path)
    assert "train.lr" in rows["0"] and "train.seed" not in rows["0"] and "model" not in rows["0"]
    assert [r["train.lr"] for r in rows.values()] == ["1e-05", "2e-05"]


def test_points_nested_one_level_deeper_are_found(tmp_path, capsys):
    for name, lr in (("lr/0", 1e-5), ("lr/1", 2e-5)):
        write_point(tmp_path, name, lr=lr, rows=metric_rows(3, lr=lr, evals={}), final=True)
    (tmp_path / "lr" / "0" / "checkpoints" / "step-3").mkdir(parents=True)
    assert main([str(tmp_path)]) == 0
    assert list(read_csv(tmp_path)) == ["lr/0", "lr/1"]


def test_missing_or_empty_directory_exits_2_naming_it(tmp_path, capsys):
    missing = tmp_path / "no_such_sweep"
    assert main([str(missing)]) == 2
    assert str(missing) in capsys.readouterr().err
    (tmp_path / "empty" / "logs").mkdir(parents=True)
    assert main([str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "empty") in err and "no sweep points" in err
    assert not (tmp_path / "empty" / "sweep_report.md").exists()


def test_cli_runs_as_a_module(sweep):
    result = subprocess.run([sys.executable, "-m", "sftdist.tools.sweep_report", str(sweep)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert best_line(result.stdout).startswith("best point: 1 (")
    assert (sweep / "sweep_report.md").exists() and (sweep / "sweep_report.csv").exists()


def test_importing_the_report_pulls_in_no_training_stack():
    heavy = ("torch", "deepspeed", "transformers", "matplotlib")
    code = (f"import sys, sftdist.tools.sweep_report; loaded = [m for m in {heavy!r} if m in sys.modules]; "
            "assert not loaded, loaded")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_docstring_examples():
    import sftdist.tools.run_files

    for module in (sweep_report, sftdist.tools.run_files):
        result = doctest.testmod(module)
        assert result.attempted > 0 and result.failed == 0


def test_the_step_0_baseline_is_not_a_points_result(tmp_path, capsys):
    """Every point's step-0 row holds the untrained model's eval loss; a point whose training only made it
    worse must not get the base model's value as its best eval loss."""
    for name, lr, final_eval in (("0", 1e-5, 2.5), ("1", 2e-5, 1.9)):
        rows = [{"step": 0, "elapsed_s": 0.5, "eval_loss": 2.0, "eval_loss/demo": 2.0, "eval_loss_delta": 0.0}]
        write_point(tmp_path, name, lr=lr, final=True, rows=rows + metric_rows(10, lr=lr, evals={10: final_eval}))
    assert main([str(tmp_path)]) == 0
    assert best_line(capsys.readouterr().out).startswith("best point: 1 (")
    rows = read_csv(tmp_path)
    assert (rows["0"]["best_eval_loss"], rows["0"]["best_eval_step"]) == ("2.5", "10")
