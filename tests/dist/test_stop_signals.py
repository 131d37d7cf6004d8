"""A stop signal that reaches only one rank stops every rank after the same step: the ranks agree through
the step's all-reduce, checkpoint together and exit with the resumable status 75, and the same command then
resumes."""

import os
import re
import signal
import subprocess
import sys
import time

from tests.conftest import FAST, REPO, read_metrics, run_cmd, train_torchrun


def worker_pids(launcher: subprocess.Popen) -> dict[int, int]:
    """``{rank: pid}`` of torchrun's workers, read from their environment."""
    ranks = {}
    for pid in subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True, text=True).stdout.split():
        env = dict(kv.split("=", 1) for kv in open(f"/proc/{pid}/environ").read().split("\0") if "=" in kv)
        if "RANK" in env:
            ranks[int(env["RANK"])] = int(pid)
    return ranks


def test_signal_on_one_rank_stops_all_after_the_same_step(tmp_path):
    run_dir = tmp_path / "run"
    args = [*FAST, "train.max_steps=200", "train.eval_every=1", f"output_dir={run_dir}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    log = tmp_path / "log.txt"  # a file, not a pipe: nobody reads a pipe while the run trains
    with log.open("w") as out_file:
        launcher = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                     "--nproc_per_node", "2", "-m", "sftdist.train", *args], cwd=REPO, env=env,
                                    stdout=out_file, stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 300
        while not ((run_dir / "metrics.jsonl").exists() and len(read_metrics(run_dir)) >= 2):
            assert launcher.poll() is None and time.time() < deadline, log.read_text()[-4000:]
            time.sleep(0.1)
        os.kill(worker_pids(launcher)[1], signal.SIGUSR1)  # rank 1 only; rank 0 writes the checkpoint
        launcher.wait(timeout=300)
    out = log.read_text()
    # Every rank exits 75 (preemption.RESUMABLE_EXIT: resumable); torchrun reports them as failed workers.
    assert launcher.returncode != 0 and re.search(r"exitcode\s*:\s*75", out), out[-4000:]
    assert "exit status 75: stopped by SIGUSR1, resumable" in out
    assert "received SIGUSR1" in out and "stopping early (SIGUSR1 received)" in out
    # The eval due at that step gives way to the checkpoint (#24).
    assert "eval skipped, SIGUSR1 received (the checkpoint comes first)" in out
    step = read_metrics(run_dir)[-1]["step"]
    assert 2 <= step < 200 and f"stopped after step {step} of 200" in out
    checkpoint = run_dir / "checkpoints" / f"step-{step}"
    assert sorted(p.name for p in checkpoint.glob("rng_state_rank*.pt")) == ["rng_state_rank0.pt",
                                                                              "rng_state_rank1.pt"]
    assert "requeued" not in out  # outside SLURM nothing is requeued
    proc = train_torchrun(2, [*FAST, "train.max_steps=200", "train.eval_every=1", "train.stop_after_steps=1",
                              f"output_dir={run_dir}"])
    assert f"after step {step}" in proc.stdout and read_metrics(run_dir)[-1]["step"] == step + 1


def test_time_budget_stops_ranks_started_apart_after_the_same_step(tmp_path):
    """Rank 1 starts 5 s after rank 0, so each rank's clock runs out at another step; the ranks agree in the
    step's all-reduce and all stop after the same step with one checkpoint. Decided per rank, rank 0 went
    into the save's barrier while rank 1 went into the next step's all-reduce, and both timed out (#1)."""
    run_dir = tmp_path / "late"
    proc = run_cmd([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    "-m", "tests.dist.late_rank", *FAST, "train.max_steps=200", "train.stop_after_minutes=0.2",
                    "parallelism.collective_timeout_s=30", f"output_dir={run_dir}"],
                   env={"SFTDIST_TEST_LATE_S": "5"}, timeout=300)
    assert "stopping early (train.stop_after_minutes=0.2" in proc.stdout
    step = read_metrics(run_dir)[-1]["step"]
    assert 1 <= step < 200 and f"stopped after step {step} of 200" in proc.stdout
    checkpoint = run_dir / "checkpoints" / f"step-{step}"
    assert sorted(p.name for p in checkpoint.glob("rng_state_rank*.pt")) == ["rng_state_rank0.pt",
                                                                              "rng_state_rank1.pt"]
