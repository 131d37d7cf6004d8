"""What only a GPU can show: bf16 training through the same entry point. Skipped without CUDA."""

import json

import pytest

from tests.conftest import FAST, read_metrics, train_single


@pytest.mark.gpu
def test_bf16_run_on_gpu(tmp_path):
    run_dir = tmp_path / "bf16"
    train_single([*FAST, "train.max_steps=20", f"output_dir={run_dir}"])
    ds = json.loads((run_dir / "ds_config.json").read_text())
    assert ds["bf16"]["enabled"] is True  # precision=auto picks bf16 on a GPU
    losses = [r["loss"] for r in read_metrics(run_dir)]
    assert losses[-1] < losses[0]
