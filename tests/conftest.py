"""Shared fixtures: an isolated asset cache, the demo tokenizer, Hydra composition, and helpers that run
the real entry points (python -m sftdist.train, torchrun, sftdist-launch) in subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

# Keep built-in demo assets out of the user's cache; subprocesses inherit this.
os.environ.setdefault("SFTDIST_CACHE", str(REPO / ".pytest_cache" / "sftdist-assets"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download anything

# Small and fast: a few optimizer steps of the tiny model on a slice of the demo data.
FAST = ["train.max_steps=3", "train.micro_batch_size=2", "train.global_batch_size=8", "train.max_length=96",
        "train.warmup_steps=0", "logging.log_every=1", "data.sources.0.max_samples=64",
        "data.sources.1.max_samples=16"]


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def demo_tokenizer():
    from sftdist.config import ModelConfig
    from sftdist.model import load_tokenizer

    return load_tokenizer(ModelConfig(tokenizer="builtin:demo", from_config={"model_type": "llama"}))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip("../shared is not present beside the checkout")
    return SHARED


def compose(overrides: list[str] | None = None):
    """The composed DictConfig for ``overrides``, as ``python -m sftdist.train`` would see it."""
    from sftdist.config import compose_raw

    return compose_raw(overrides or [])


def run_cmd(cmd: list[str], *, timeout: int = 600, check: bool = True,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run a command from the repo root (``env``: extra variables); on failure show its output."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"command failed ({proc.returncode}): {' '.join(cmd)}\n"
                             f"--- stdout ---\n{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-6000:]}")
    return proc


def train_single(overrides: list[str], **kw) -> subprocess.CompletedProcess:
    return run_cmd([sys.executable, "-m", "sftdist.train", *overrides], **kw)


def train_torchrun(nproc: int, overrides: list[str], **kw) -> subprocess.CompletedProcess:
    return run_cmd([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                    str(nproc), "-m", "sftdist.train", *overrides], **kw)


def read_metrics(run_dir: Path, *, baseline: bool = False) -> list[dict]:
    """The training steps' rows of ``metrics.jsonl``; with ``baseline`` also the step-0 eval row."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if baseline or r["step"] > 0]


@pytest.fixture(scope="session")
def trained_runs(tmp_path_factory):
    """Train once per distinct layout and share the run directory between tests.

    ``trained_runs(name, nproc, overrides)`` -> run directory. ``nproc=0`` means no launcher at all
    (``python -m sftdist.train``); otherwise torchrun with that many processes.
    """
    cache: dict[str, Path] = {}
    root = tmp_path_factory.mktemp("runs")

    def get(name: str, nproc: int, overrides: list[str]) -> Path:
        if name not in cache:
            run_dir = root / name
            args = [*FAST, *overrides, f"output_dir={run_dir}"]
            proc = train_single(args) if nproc == 0 else train_torchrun(nproc, args)
            (run_dir / "stdout.txt").write_text(proc.stdout)
            cache[name] = run_dir
        return cache[name]

    return get
