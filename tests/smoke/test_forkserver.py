"""The fork server (``tests/forkserver.py``) runs what a fresh interpreter runs. Most of the suite's training
runs are forked from it, so this is the check that it hides nothing: the same command forked and started
fresh gives bit-identical metrics, the same run directory and the same weights, for one process
(``python -m sftdist.train``) and for two ranks (forked ranks against the real torchrun). The fresh runs
also show the warning policy (``sftdist.QUIET_WARNINGS``): third-party deprecations gone, sftdist's own
warnings kept."""

import re

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import FAST, fork_server, read_metrics, train_single, train_torchrun

TIMING = re.compile(r"per_sec|elapsed|step_time|mfu|mem/")  # what the clock or the allocator decides
# What every process (each rank, some every step) printed before sftdist.quiet_third_party_warnings().
NOISE = re.compile(r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated|"
                   r"`(is_)?gradient_checkpointing(_enable)?` is deprecated")


def deterministic(run_dir) -> list[dict]:
    return [{k: v for k, v in row.items() if not TIMING.search(k)} for row in read_metrics(run_dir, baseline=True)]


def log_shape(text: str, run_dir) -> list[str]:
    """sftdist's log lines with the run directory, numbers and timings blanked."""
    lines = [line.replace(str(run_dir), "RUN") for line in text.splitlines() if line.startswith("[sftdist")]
    return [re.sub(r"\s+", " ", re.sub(r"\d[\d.,:e+-]*", "N", line)) for line in lines]


def files(run_dir) -> list[str]:
    return sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.name != "stdout.txt")


@pytest.mark.parametrize("name,nproc", [("single_ga4", 0), ("torchrun2_ga2", 2)])
def test_a_forked_run_equals_a_fresh_interpreter(trained_runs, tmp_path, name, nproc):
    if fork_server() is None:
        pytest.skip("the fork server is off (SFTDIST_TEST_FRESH=1, or it could not start): nothing to compare")
    forked = trained_runs(name, nproc, [])  # shared with tests/smoke/test_train_cpu.py
    fresh = tmp_path / "fresh"
    args = [*FAST, f"output_dir={fresh}"]
    proc = train_single(args, fresh=True) if nproc == 0 else train_torchrun(nproc, args, fresh=True)
    assert deterministic(forked) == deterministic(fresh)
    assert files(forked) == files(fresh)
    a, b = load_file(forked / "final" / "model.safetensors"), load_file(fresh / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert log_shape((forked / "stdout.txt").read_text(), forked) == log_shape(proc.stdout, fresh)
    output = proc.stdout + proc.stderr  # a fresh interpreter's: its imports' warnings are its own
    assert not NOISE.search(output), NOISE.search(output)
    # sftdist's own warning, which asks the user to act, still shows.
    assert "] warning: data source 'demo_chat': its eval split has only 3 records" in proc.stdout
