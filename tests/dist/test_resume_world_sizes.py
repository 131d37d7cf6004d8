"""A checkpoint resumes on another number of ranks under every ZeRO stage (ZeRO-0 loads as it is; ZeRO 1-3
through DeepSpeed's universal format), and on two emulated nodes the conversion happens once."""

import json
import os
import subprocess
import sys

import pytest

from sftdist.cluster.launch import free_port
from tests.conftest import FAST, REPO, read_metrics, run_cmd, train_single, train_torchrun

SIX = [*FAST, "train.max_steps=6", "train.lr=1e-2"]


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("whole") / "run"
    train_single([*SIX, f"output_dir={run_dir}"])
    return read_metrics(run_dir)


def train(nproc, args, **kw):
    return train_single(args, **kw) if nproc == 1 else train_torchrun(nproc, args, **kw)


@pytest.mark.parametrize("stage,saved_on,resumed_on", [("zero0", 1, 2), ("zero1", 2, 1), ("zero2", 2, 1),
                                                       ("zero3", 1, 2)])
def test_resume_on_another_world_size(tmp_path, whole, stage, saved_on, resumed_on):
    run_dir = tmp_path / "run"
    train(saved_on, [*SIX, f"parallelism={stage}", "train.stop_at_step=3", f"output_dir={run_dir}"])
    if stage == "zero0":  # rank 1 sees no checkpoint (a stale shared-filesystem view): rank 0 decides (#26)
        proc = run_cmd([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "tests.dist.stale_view", *SIX, f"parallelism={stage}", f"output_dir={run_dir}"])
    else:
        proc = train(resumed_on, [*SIX, f"parallelism={stage}", f"output_dir={run_dir}"])
    assert "after step 3" in proc.stdout
    ds_config = json.loads((run_dir / "ds_config.json").read_text())
    if stage == "zero0":  # the whole optimizer state is in one file: nothing to convert
        assert "converted" not in proc.stdout and "checkpoint" not in ds_config
    else:
        assert f"checkpoint written by {saved_on} rank(s), resuming on {resumed_on}" in proc.stdout
        assert ds_config["checkpoint"] == {"load_universal": True}
    got = read_metrics(run_dir)
    assert [r["step"] for r in got] == list(range(1, 7))
    # Other ranks and stages reduce in another order: equal to ~1e-6, not bit for bit.
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in whole], rel=1e-5)


def test_two_nodes_convert_once(tmp_path, whole):
    """Both emulated nodes have a local rank 0 on the same (shared) file system: only global rank 0 converts."""
    run_dir = tmp_path / "run"
    train_single([*SIX, "train.stop_at_step=3", f"output_dir={run_dir}"])
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node),
         "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port),
         "-m", "sftdist.train", *SIX, f"output_dir={run_dir}"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for node in (0, 1)]
    outputs = [p.communicate(timeout=600) for p in nodes]
    for p, (out, err) in zip(nodes, outputs):
        assert p.returncode == 0, f"--- stdout ---\n{out[-4000:]}\n--- stderr ---\n{err[-4000:]}"
    assert "checkpoint written by 1 rank(s), resuming on 2" in outputs[0][0]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step-3")) == \
        ["step-3", "step-3.universal"]
    got = read_metrics(run_dir)
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in whole], rel=1e-5)
