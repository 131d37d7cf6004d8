"""The local SLURM cluster itself, with real jobs: srun tasks, requeue, and how signals reach the ranks.

The signal tests pin down what the preemption handling relies on (measured on slurm-wlm 22.05, Debian 12):
- ``scancel --signal=USR1 JOB`` and ``sbatch --signal=USR1@S``: every srun task gets SIGUSR1, the batch
  shell does not.
- ``--batch`` / ``--signal=B:USR1@S``: only the batch shell; srun does not pass it on to the tasks.
- ``--full``: the batch shell and every srun task.
- ``scancel JOB`` and ``scontrol requeue JOB``: SIGCONT + SIGTERM to the batch shell and every task, SIGKILL
  after KillWait (5 s here, 30 s by default).
"""

from __future__ import annotations

import shlex
import socket
import time
from pathlib import Path

import pytest

# The SLURM tier runs in its own serial phase of `make test` (tests/run.sh), not beside other tests.
pytestmark = pytest.mark.slurm

# --------------------------------------------------------------------------------------------- helpers


def _wait_for(pred, timeout: float, what: str, poll: float = 0.1):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(poll)


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


# Each srun task: handlers for SIGUSR1/SIGTERM that append the signal name to task-<rank>.log, then "ready";
# it returns once it got SIGUSR1, or the batch shell touched <dir>/stop, or after <seconds>.
SIGNAL_TASK = r'''
import os, signal, sys, time
d, seconds = sys.argv[1], float(sys.argv[2])
log = open(os.path.join(d, "task-%s.log" % os.environ["SLURM_PROCID"]), "a", buffering=1)
got = []
def handler(sig, frame):
    log.write(signal.Signals(sig).name + "\n"); got.append(sig)
signal.signal(signal.SIGUSR1, handler)
signal.signal(signal.SIGTERM, handler)
log.write("ready\n")
end = time.time() + seconds
while time.time() < end and signal.SIGUSR1 not in got and not os.path.exists(os.path.join(d, "stop")):
    time.sleep(0.05)
log.write("exit\n")
'''

# The batch shell traps USR1/TERM (logging them to batch.log), starts the 2 tasks with srun in the background
# and waits for srun across trapped signals; on USR1 it lets the tasks stop a second later.
SIGNAL_BATCH = '''#!/bin/bash
D={d}
trap 'echo USR1 >> $D/batch.log; (sleep 1; touch $D/stop) &' USR1
trap 'echo TERM >> $D/batch.log' TERM
echo ready >> $D/batch.log
srun --ntasks=2 {python} {task} $D {seconds} &
pid=$!
while :; do wait $pid; rc=$?; kill -0 $pid 2>/dev/null || break; done
echo "srun-exit $rc" >> $D/batch.log
'''


def _signal_job(cluster, d: Path, seconds: float, opts=()) -> int:
    d.mkdir(parents=True, exist_ok=True)
    (d / "task.py").write_text(SIGNAL_TASK)
    script = d / "job.sh"
    script.write_text(SIGNAL_BATCH.format(d=shlex.quote(str(d)), python=shlex.quote(cluster.python),
                                          task=shlex.quote(str(d / "task.py")), seconds=seconds))
    return cluster.sbatch(script, opts=["--ntasks=2", f"--output={d}/out-%j.txt", *opts])


def _ready(d: Path) -> bool:
    return all("ready" in _lines(d / f) for f in ("batch.log", "task-0.log", "task-1.log"))


def _received(d: Path, sig: str) -> tuple[bool, list[int]]:
    """(batch shell got sig, ranks that got sig)"""
    batch = sig in _lines(d / "batch.log")
    ranks = [r for r in (0, 1) if ("SIG" + sig) in _lines(d / f"task-{r}.log")]
    return batch, ranks


# --------------------------------------------------------------------------------------------- tests


def test_cluster_shape(slurm_cluster):
    assert slurm_cluster.nodes == 1 and len(slurm_cluster.node_names) == 1
    assert slurm_cluster.cpus_per_node >= 2
    assert "JobRequeue=1" in slurm_cluster.run("scontrol", "show", "config").stdout.replace(" ", "")


def test_sbatch_two_srun_tasks(slurm_cluster, tmp_path):
    script = tmp_path / "job.sh"
    code = 'import os, sys; print("rank", os.environ["SLURM_PROCID"], "of", os.environ["SLURM_NTASKS"], sys.executable)'
    script.write_text(f"#!/bin/bash\n#SBATCH --ntasks=2\n#SBATCH --output={tmp_path}/out-%j.txt\n"
                      f"srun {shlex.quote(slurm_cluster.python)} -c {shlex.quote(code)}\n")
    job = slurm_cluster.sbatch(script)
    assert slurm_cluster.wait(job, timeout=60) == "COMPLETED", (tmp_path / f"out-{job}.txt").read_text()
    assert slurm_cluster.exit_code(job) == "0:0"
    out = sorted(line for line in _lines(tmp_path / f"out-{job}.txt") if line.startswith("rank"))
    assert out == [f"rank 0 of 2 {slurm_cluster.python}", f"rank 1 of 2 {slurm_cluster.python}"]


def test_failed_job_state(slurm_cluster, tmp_path):
    job = slurm_cluster.submit("exit 3", opts=[f"--output={tmp_path}/out-%j.txt"])
    assert slurm_cluster.wait(job, timeout=60) == "FAILED"
    assert slurm_cluster.exit_code(job) == "3:0"


# SLURM's own behaviour, which the preemption handling relies on (not sftdist's: tests/slurm/test_training_jobs.py
# tests that): opt-in with `-m slow`, e.g. to check another SLURM version.
@pytest.mark.slow
def test_scontrol_requeue_reruns_the_job(slurm_cluster, tmp_path):
    """``scontrol requeue`` kills the running job and runs it again with SLURM_RESTART_COUNT=1 (unset on the
    first run). Without --open-mode=append the rerun truncates the output file."""
    script = tmp_path / "job.sh"
    script.write_text(f"""#!/bin/bash
#SBATCH --ntasks=1
#SBATCH --output={tmp_path}/out-%j.txt
echo "start restart=${{SLURM_RESTART_COUNT-unset}}" >> {tmp_path}/starts.txt
echo "output of run ${{SLURM_RESTART_COUNT-0}}"
if [ -z "${{SLURM_RESTART_COUNT-}}" ]; then exec sleep 300; fi
""")
    job = slurm_cluster.sbatch(script)
    _wait_for(lambda: _lines(tmp_path / "starts.txt"), 60, "the first run")
    assert slurm_cluster.state(job) == "RUNNING"
    t0 = time.monotonic()
    slurm_cluster.requeue(job)
    assert slurm_cluster.wait(job, timeout=90) == "COMPLETED"
    print(f"requeue -> rerun completed in {time.monotonic() - t0:.1f}s")
    assert _lines(tmp_path / "starts.txt") == ["start restart=unset", "start restart=1"]
    assert slurm_cluster.info(job)["Restarts"] == "1"
    out = (tmp_path / f"out-{job}.txt").read_text()
    assert "output of run 1" in out and "output of run 0" not in out  # truncated by the rerun


SELF_REQUEUE_RANK = r'''
import os, signal, subprocess, sys, time

d = sys.argv[1]
rank, restart = os.environ["SLURM_PROCID"], os.environ.get("SLURM_RESTART_COUNT")
log = open(os.path.join(d, "rank%s.log" % rank), "a", buffering=1)
got = []
def handler(sig, frame):
    log.write("%s %.2f\n" % (signal.Signals(sig).name, time.time())); got.append(sig)
signal.signal(signal.SIGTERM, handler)
log.write("start restart=%s\n" % restart)
print("rank", rank, "run", restart or 0, flush=True)
if restart is None:
    open(os.path.join(d, "ckpt%s" % rank), "w").write("step 10\n")   # every rank saves its shard
    if rank == "0":
        while not all(os.path.exists(os.path.join(d, "ckpt%d" % r)) for r in range(2)):
            time.sleep(0.05)
        log.write("requeue %.2f\n" % time.time())
        subprocess.run(["scontrol", "requeue", os.environ["SLURM_JOB_ID"]], check=True)
    end = time.time() + 120
    while not got and time.time() < end:
        time.sleep(0.05)
    log.write("exit after SIGTERM\n")
    sys.exit(0)
assert open(os.path.join(d, "ckpt%s" % rank)).read() == "step 10\n"
log.write("resumed\n")
'''


def test_rank0_requeues_its_own_job(slurm_cluster, tmp_path):
    """The preemption plan: srun starts every rank, rank 0 runs ``scontrol requeue $SLURM_JOB_ID`` after the
    checkpoint; every rank (rank 0 too) then gets SIGTERM, the job reruns with SLURM_RESTART_COUNT=1 and
    --open-mode=append keeps the output of both runs."""
    (tmp_path / "rank.py").write_text(SELF_REQUEUE_RANK)
    script = tmp_path / "job.sh"
    script.write_text(f"""#!/bin/bash
#SBATCH --ntasks=2
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output={tmp_path}/out-%j.txt
srun --kill-on-bad-exit=1 {shlex.quote(slurm_cluster.python)} {tmp_path}/rank.py {tmp_path}
""")
    job = slurm_cluster.sbatch(script)
    assert slurm_cluster.wait(job, timeout=120) == "COMPLETED", (tmp_path / f"out-{job}.txt").read_text()
    assert slurm_cluster.info(job)["Restarts"] == "1"
    for r in (0, 1):
        log = [line.split()[0] if line.startswith(("SIGTERM", "requeue")) else line
               for line in _lines(tmp_path / f"rank{r}.log")]
        expect = ["start restart=None", *(["requeue"] if r == 0 else []), "SIGTERM", "exit after SIGTERM",
                  "start restart=1", "resumed"]
        assert log == expect, f"rank {r}: {log}"
    out = _lines(tmp_path / f"out-{job}.txt")
    assert {"rank 0 run 0", "rank 1 run 0", "rank 0 run 1", "rank 1 run 1"} <= set(out), out


# which processes a signal reaches: (batch shell, srun tasks)
SCANCEL_FORMS = {
    "scancel --signal=USR1": ((), False, [0, 1]),
    "scancel --signal=USR1 --batch": (("--batch",), True, []),
    "scancel --signal=USR1 --full": (("--full",), True, [0, 1]),
}


# SLURM's own behaviour, which the preemption handling relies on (not sftdist's: tests/slurm/test_training_jobs.py
# tests that): opt-in with `-m slow`, e.g. to check another SLURM version.
@pytest.mark.slow
@pytest.mark.parametrize("form", list(SCANCEL_FORMS))
def test_scancel_signal_delivery(slurm_cluster, tmp_path, form):
    extra, to_batch, to_ranks = SCANCEL_FORMS[form]
    job = _signal_job(slurm_cluster, tmp_path, seconds=45)
    _wait_for(lambda: _ready(tmp_path), 60, "batch shell and both tasks to install their handlers")
    slurm_cluster.scancel(job, "--signal=USR1", *extra)
    assert slurm_cluster.wait(job, timeout=90) == "COMPLETED", slurm_cluster.info(job)
    assert _received(tmp_path, "USR1") == (to_batch, to_ranks), form


# SLURM's own behaviour, which the preemption handling relies on (not sftdist's: tests/slurm/test_training_jobs.py
# tests that): opt-in with `-m slow`, e.g. to check another SLURM version.
@pytest.mark.slow
def test_sbatch_signal_option_delivery(slurm_cluster, tmp_path):
    """``--signal=USR1@S`` reaches every srun task (not the batch shell); ``--signal=B:USR1@S`` only the batch
    shell. slurmctld checks these every 30 s, so the signal comes 0-30 s after it is due (here 5 s after the
    start); the two jobs run side by side (--overcommit: 1 CPU each)."""
    opts = ["--time=1", "--overcommit"]
    jobs = {"tasks": _signal_job(slurm_cluster, tmp_path / "tasks", 55, [*opts, "--signal=USR1@55"]),
            "batch": _signal_job(slurm_cluster, tmp_path / "batch", 55, [*opts, "--signal=B:USR1@55"])}
    t0 = time.monotonic()
    states = {k: slurm_cluster.wait(j, timeout=120) for k, j in jobs.items()}
    print(f"--signal jobs done after {time.monotonic() - t0:.1f}s")
    assert states == {"tasks": "COMPLETED", "batch": "COMPLETED"}
    assert _received(tmp_path / "tasks", "USR1") == (False, [0, 1])
    assert _received(tmp_path / "batch", "USR1") == (True, [])


# SLURM's own behaviour, which the preemption handling relies on (not sftdist's: tests/slurm/test_training_jobs.py
# tests that): opt-in with `-m slow`, e.g. to check another SLURM version.
@pytest.mark.slow
def test_scancel_sends_sigterm_then_kills(slurm_cluster, tmp_path):
    """Plain ``scancel``: SIGTERM to the batch shell and every task; tasks that keep running get SIGKILL
    after KillWait (5 s on this cluster)."""
    job = _signal_job(slurm_cluster, tmp_path, seconds=60)
    _wait_for(lambda: _ready(tmp_path), 60, "batch shell and both tasks to install their handlers")
    t0 = time.monotonic()
    slurm_cluster.scancel(job)
    assert slurm_cluster.wait(job, timeout=60) == "CANCELLED"
    dt = time.monotonic() - t0
    assert _received(tmp_path, "TERM") == (True, [0, 1])
    for r in (0, 1):
        assert "exit" not in _lines(tmp_path / f"task-{r}.log")  # killed, did not return
    assert dt >= 3, f"tasks were killed {dt:.1f}s after scancel, before KillWait"


def test_two_emulated_nodes(slurm_two_nodes, tmp_path):
    cluster = slurm_two_nodes
    assert cluster.nodes == 2 and cluster.node_names == ["n1", "n2"]
    code = ('import os, socket; print("task", os.environ["SLURM_PROCID"], os.environ["SLURMD_NODENAME"], '
            'socket.gethostbyname(os.environ["SLURMD_NODENAME"]))')
    job = cluster.submit(f"srun {shlex.quote(cluster.python)} -c {shlex.quote(code)}",
                         opts=["--nodes=2", "--ntasks=2", "--ntasks-per-node=1", f"--output={tmp_path}/out-%j.txt"])
    assert cluster.wait(job, timeout=60) == "COMPLETED"
    out = sorted(line for line in _lines(tmp_path / f"out-{job}.txt") if line.startswith("task"))
    assert out == ["task 0 n1 127.0.0.1", "task 1 n2 127.0.0.1"]
    assert socket.gethostbyname("n1") == "127.0.0.1"
