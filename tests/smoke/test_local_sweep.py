"""A local Hydra multirun (``sftdist-train -m``) trains each point in its own run directory under the sweep
directory, never sharing one, with a W&B group named after the sweep and a run name carrying its overrides;
``sftdist sweep-report`` then names the best point."""

import sys

import yaml

from tests.conftest import FAST, read_metrics, run_cmd


def test_local_multirun_points_get_their_own_run_directories(tmp_path):
    """Also: a diverging point (lr=1e30: NaN from step 2) fails alone; the sweep goes on to the next points
    and exits non-zero at its end, naming the failed point (#7)."""
    sweep = tmp_path / "sweep"
    proc = run_cmd([sys.executable, "-m", "sftdist.train", "-m", *FAST, "train.max_steps=2",
                    f"hydra.sweep.dir={sweep}", "train.lr=1e30,1e-3,1e-2"], check=False)
    assert proc.returncode == 1 and "1 sweep point(s) failed: 0 (" in proc.stderr, proc.stderr
    points = sorted(p.name for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert points == ["0", "1", "2"] and not (sweep / "0" / "final").exists()
    lrs = []
    for point in points[1:]:
        config = yaml.safe_load((sweep / point / "config.yaml").read_text())
        assert config["output_dir"] == str(sweep / point) and (sweep / point / "final").is_dir()
        assert config["logging"]["wandb_group"] == "sweep" and f"train.lr={config['train']['lr']}" in config["run_name"]
        assert [r["step"] for r in read_metrics(sweep / point)] == [1, 2]
        lrs.append(config["train"]["lr"])
    assert sorted(lrs) == [1e-3, 1e-2]
    report = run_cmd([sys.executable, "-m", "sftdist", "sweep-report", str(sweep)])
    finals = {p: read_metrics(sweep / p)[-1]["eval_loss"] for p in points[1:]}
    assert f"best point: {min(finals, key=finals.get)} " in report.stdout
    assert (sweep / "sweep_report.csv").read_text().count("\n") >= 4
