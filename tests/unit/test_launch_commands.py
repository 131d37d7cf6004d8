"""sftdist-launch builds commands without importing torch: torchrun (c10d across nodes), the deepspeed
launcher (hostfile or one launcher per node), and SLURM batch scripts in which no config value can run
code. The scripts are run by a real bash here, with stand-ins for srun and scontrol."""

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from sftdist.cluster.launch import launcher_command
from sftdist.cluster.launch import hydra_quoted
from sftdist.cluster.slurm import slurm_rank_env
from sftdist.config import ConfigError, LaunchConfig
from tests.conftest import run_cmd

HOSTILE = 'x"; touch {marker}; "'


def test_docstring_examples():
    import doctest

    import sftdist.cluster.slurm
    import sftdist.config.launch

    for module in (sftdist.cluster.slurm, sftdist.config.launch):
        result = doctest.testmod(module)
        assert result.attempted > 0 and result.failed == 0


def test_launcher_imports_no_torch():
    code = ("import sys; from sftdist.cluster.launch import main; main(['--dry-run']); "
            "bad = [m for m in ('torch', 'deepspeed', 'transformers') if m in sys.modules]; assert not bad, bad")
    run_cmd([sys.executable, "-c", code], fresh=True)  # what a fresh interpreter imports is the point


def test_multi_node_commands():
    torchrun = launcher_command(LaunchConfig(nnodes=2, rdzv_endpoint="node1:29400"), ["a=1"], nproc=8)
    assert torchrun[3:11] == ["--nnodes", "2", "--rdzv_backend", "c10d", "--rdzv_endpoint", "node1:29400",
                              "--rdzv_id", "sftdist-29500"]
    ds = launcher_command(LaunchConfig(launcher="deepspeed", hostfile="/etc/hosts.ds", master_addr="n1"), [], nproc=8)
    assert ds[ds.index("--hostfile") + 1] == "/etc/hosts.ds" and "--no_ssh" not in ds
    per_node = launcher_command(LaunchConfig(launcher="deepspeed", nnodes=2, node_rank=1), [], nproc=8)
    assert "--no_ssh" in per_node and per_node[per_node.index("--node_rank") + 1] == "1"


def test_slurm_values_must_be_one_line():
    with pytest.raises(ConfigError, match="launch.partition"):
        LaunchConfig(partition="gpu\n#SBATCH --account=someone-else")
    with pytest.raises(ConfigError, match="launch.setup"):
        LaunchConfig(setup=["module load a\nrm -rf ~"])


def test_rank_env_from_srun():
    assert slurm_rank_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_ID": "7"}) is None
    # A plain python in the batch script of a 4-task allocation is one process, not rank 0 of 4 (#16).
    assert slurm_rank_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_TASKS_PER_NODE": "4",
                           "SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "n1"}) is None
    env = slurm_rank_env({"SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "2", "SLURM_LOCALID": "1",
                          "SLURM_STEP_TASKS_PER_NODE": "2", "SLURM_JOB_ID": "45000", "MASTER_ADDR": "vm"})
    assert env == {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                   "MASTER_ADDR": "vm", "MASTER_PORT": str(20000 + 45000 % 40000)}


def stand_ins(tmp_path: Path) -> Path:
    """srun records its argv (one per line); scontrol answers ``show hostnames`` with node1."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(f'#!/bin/bash\nprintf "%s\\n" "$@" > {tmp_path}/srun.argv\n'
                                  f'env | grep -E "^(MASTER_ADDR|MASTER_PORT|SFTDIST_REQUEUE)=" > {tmp_path}/srun.env\n')
    (bin_dir / "scontrol").write_text("#!/bin/bash\necho node1\necho node2\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return bin_dir


def test_slurm_script_quotes_every_config_value(tmp_path):
    marker = tmp_path / "pwned"
    run_dir = tmp_path / "run dir"  # a space in the path, too
    hostile = f"run_name='{HOSTILE.format(marker=marker)}'"
    proc = run_cmd([sys.executable, "-m", "sftdist.cluster.launch", "--dry-run", "launch=slurm", "launch.nnodes=2",
                    "launch.gpus_per_node=4", "launch.partition=gpu", "launch.time=12:00:00",
                    "launch.setup=['export SETUP_RAN=1']", hostile, f"output_dir={run_dir}"])
    script = run_dir / "job.sbatch"
    assert f"wrote {script}" in proc.stdout and not (run_dir / "prepare.sbatch").exists()
    text = script.read_text()
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --partition=gpu", "#SBATCH --time=12:00:00", "#SBATCH --signal=USR1@300",
                 "#SBATCH --requeue", "export SETUP_RAN=1"):
        assert line in text.splitlines(), line
    subprocess.run(["bash", "-n", str(script)], check=True)
    env = {**os.environ, "PATH": f"{stand_ins(tmp_path)}:{os.environ['PATH']}", "SLURM_JOB_ID": "123",
           "SLURM_JOB_NODELIST": "node[1-2]"}
    subprocess.run(["bash", str(script)], check=True, env=env, cwd=tmp_path)
    argv = (tmp_path / "srun.argv").read_text().splitlines()
    assert not marker.exists()  # the hostile run_name was an argument, never shell code
    assert hostile in argv and f"output_dir={hydra_quoted(str(run_dir))}" in argv
    assert argv[:4] == ["--kill-on-bad-exit=1", sys.executable, "-m", "sftdist.train"]
    got_env = dict(line.split("=", 1) for line in (tmp_path / "srun.env").read_text().splitlines())
    assert got_env == {"MASTER_ADDR": "node1", "MASTER_PORT": str(20000 + 123), "SFTDIST_REQUEUE": "1"}


def test_prepare_first_writes_a_cpu_job(tmp_path):
    run_cmd([sys.executable, "-m", "sftdist.cluster.launch", "--dry-run", "launch=slurm", "launch.prepare_first=true",
             f"output_dir={tmp_path}"])
    text = (tmp_path / "prepare.sbatch").read_text()
    assert "--gpus-per-node" not in text and "#SBATCH --ntasks-per-node=1" in text.splitlines()
    command = shlex.split(text.splitlines()[-1])
    assert command[:5] == [sys.executable, "-m", "sftdist", "data", "prepare"]
    assert "#SBATCH --gpus-per-node=8" in (tmp_path / "job.sbatch").read_text().splitlines()


def test_slurm_wait_is_refused_elsewhere():
    proc = run_cmd([sys.executable, "-m", "sftdist.cluster.launch", "--wait"], check=False)
    assert proc.returncode != 0 and "--wait is for launch=slurm" in proc.stderr


def test_slurm_time_limits_are_checked_when_composed():
    """A time SLURM would not take is refused naming launch.time; UNLIMITED is a valid sbatch limit, but a
    submitit sweep needs minutes, so that conversion refuses it with one line instead of crashing (#22)."""
    from sftdist.config import slurm_minutes

    for bad in ("4h", "1-", "12:00:00:00", "soon"):
        with pytest.raises(ConfigError, match="launch.time"):
            LaunchConfig(time=bad)
    for good in ("90", "30:00", "04:00:00", "2-00", "1-12:30", "1-12:30:00", "UNLIMITED", "infinite"):
        LaunchConfig(time=good)
    with pytest.raises(ConfigError, match="finite time limit"):
        slurm_minutes("UNLIMITED")


def test_torchrun_gets_the_shutdown_grace_period():
    """torchrun SIGKILLs its ranks 30 s after a SIGTERM unless told otherwise; the launcher passes
    launch.shutdown_timeout_s in the variable the installed torch reads (#3)."""
    from torch.distributed.launcher.api import LaunchConfig as TorchLaunchConfig

    from sftdist.cluster.launch import launcher_env

    env = launcher_env(LaunchConfig(shutdown_timeout_s=900))
    assert env == {"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "900"}
    assert launcher_env(LaunchConfig(launcher="deepspeed")) == {}  # fixed at 30 s there (docs/failures.md)
    saved = os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT")
    os.environ.update(env)
    try:
        assert TorchLaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=1).shutdown_timeout == 900
    finally:
        os.environ.pop("TORCH_ELASTIC_SHUTDOWN_TIMEOUT")
        if saved is not None:
            os.environ["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] = saved


def test_a_run_dir_with_hydra_syntax_reaches_the_ranks_intact(tmp_path):
    """output_dir='/runs/lr=1e-5,bs=8' is pinned for the ranks quoted, so their parser reads the same path
    (unquoted, `,` and `=` split it) (#13)."""
    from sftdist.cluster.launch import resolve_launch
    from sftdist.config import compose_config

    for name in ("lr=1e-5,bs=8", "a b", "it's", "[x]"):
        run_dir = str(tmp_path / name)
        quoted = f"output_dir='{run_dir}'" if "'" not in name else f'output_dir="{run_dir}"'
        _, pinned = resolve_launch(["train.lr=1e-4", quoted])
        assert compose_config(pinned).output_dir == run_dir


def test_sweep_points_take_every_launch_resource():
    """hydra/launcher=slurm maps launch.setup, mem, requeue and sbatch_extra into submitit's job as
    launch=slurm maps them into job.sbatch; they were silently dropped (#12)."""
    from hydra import compose, initialize_config_module

    from sftdist.config import register_configs

    register_configs()
    with initialize_config_module(config_module="sftdist.conf", version_base=None):
        cfg = compose(config_name="config", return_hydra_config=True, overrides=[
            "hydra/launcher=slurm", "launch.mem=64G", "launch.requeue=false", "launch.setup=['module load cuda']",
            "launch.sbatch_extra=['--exclusive','--mail-type=END']"])
    launcher = cfg.hydra.launcher
    assert list(launcher.setup) == ["module load cuda"]
    assert dict(launcher.additional_parameters) == {"export": "ALL,SLURM_KILL_BAD_EXIT=1", "mem": "64G",
                                                    "no_requeue": True, "exclusive": True, "mail-type": "END"}
