"""bench/gpu/run.sh --cpu-smoke: every phase of the prepared device run (bench/gpu/device_run.py) on this CPU,
tiny and fp32, so that the script a GPU loan runs once cannot rot between loans. One run; its summary is
read for every phase's output."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO, SHARED

ASSETS = (SHARED / "tokenizers" / "qwen2", SHARED / "datasets" / "llamafactory_alpaca_en_demo.json")


@pytest.mark.skipif(not all(p.exists() for p in ASSETS), reason="needs ../shared's Qwen2 tokenizer and alpaca data")
def test_the_device_script_runs_every_phase_on_cpu(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path / "out"), PY=sys.executable, SFTDIST_GPU_WORK=str(tmp_path / "work"))
    proc = subprocess.run(["bash", "bench/gpu/run.sh", "--cpu-smoke"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    summary = json.loads((tmp_path / "out" / "gpu_run.json").read_text())
    assert list(summary["phase_seconds"]) == ["versions", "correctness", "memory", "throughput"]
    assert summary["versions"]["torch"] and summary["versions"]["deepspeed"]
    checks = {c["check"]: c for c in summary["correctness"]}
    assert {"ZeRO-2 trains", "ZeRO-3 = ZeRO-2", "resume = uninterrupted", "LoRA under ZeRO-3 saves its adapter",
            "final/ generates", "QLoRA"} <= set(checks)
    assert all(c["ok"] for c in checks.values()), checks
    assert "0.00e+00" in checks["resume = uninterrupted"]["detail"]  # bit for bit on CPU
    memory = {m["run"]: m for m in summary["memory"]}
    assert {"zero2", "lora_zero3"} <= set(memory) and all(m["predicted_gib"] > 0 for m in memory.values())
    measured = {r["case"]: r for r in summary["throughput"] if "supervised_tok_s" in r}
    assert {"sftdist", "sftdist LoRA"} <= set(measured)
    assert all(r["supervised_tok_s"] > 0 and 0 < r["mfu"] for r in measured.values())
    table = (tmp_path / "out" / "gpu_run.md").read_text()
    assert "| ZeRO-3 = ZeRO-2 | ok |" in table and "| sftdist | 256 |" in table
