"""Checkpoints cannot run code, with the real DeepSpeed engine: a run stopped after step 1 resumes under
sftdist's weights_only loader (ZeRO-0, ZeRO-2, ZeRO-3, LoRA under ZeRO-3); a checkpoint file replaced by a
pickle that would run ``touch`` (model states, optimizer states, RNG state) is refused with one clear line
and the command never runs, on resume and in the universal-checkpoint conversion; final/ and the merged
export hold safetensors only. Two optimizer steps of the tiny model, max_length 96."""

import shutil
import sys
from pathlib import Path

import pytest

from tests.conftest import FAST, read_metrics, run_cmd, train_single
from tests.unit.test_security import plant_pickle

TWO = [*FAST, "train.max_steps=2", "train.global_batch_size=4", "train.eval_at_start=false"]
LAYOUTS = {"zero0": ["parallelism=zero0"], "zero2": ["parallelism=zero2"], "zero3": ["parallelism=zero3"],
           "zero3_lora": ["parallelism=zero3", "peft=lora"]}
PICKLED = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    """``stopped(layout)``: a run directory holding only the checkpoint after step 1 (trained once per layout)."""
    runs: dict[str, Path] = {}

    def get(layout: str) -> Path:
        if layout not in runs:
            run_dir = tmp_path_factory.mktemp("stopped") / layout
            train_single([*TWO, *LAYOUTS[layout], "train.stop_at_step=1", f"output_dir={run_dir}"])
            assert (run_dir / "checkpoints" / "step-1" / "trainer_state.json").exists()
            runs[layout] = run_dir
        return runs[layout]

    return get


def copy_of(run_dir: Path, dst: Path) -> Path:
    shutil.copytree(run_dir, dst, symlinks=True)
    return dst


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_resume_under_the_weights_only_loader(stopped, tmp_path, layout):
    run_dir = copy_of(stopped(layout), tmp_path / "run")
    proc = train_single([*TWO, *LAYOUTS[layout], f"output_dir={run_dir}"])
    assert f"resumed from {run_dir}/checkpoints/step-1 after step 1" in proc.stdout
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2]
    final = {p.name for p in (run_dir / "final").iterdir()}
    assert ("adapter_model.safetensors" if "lora" in layout else "model.safetensors") in final
    assert not [name for name in final if name.endswith(PICKLED)]
    if "lora" in layout:  # the export CLI: the base with the adapter merged in, as safetensors
        run_cmd([str(Path(sys.executable).with_name("sftdist-export")), "--merge", str(run_dir)])
        merged = {p.name for p in (run_dir / "final_merged").iterdir()}
        assert "model.safetensors" in merged and not [name for name in merged if name.endswith(PICKLED)]


@pytest.mark.parametrize("layout,name", [("zero0", "mp_rank_00_model_states.pt"),
                                         ("zero2", "zero_pp_rank_0_mp_rank_00_optim_states.pt"),
                                         ("zero3", "zero_pp_rank_0_mp_rank_00_model_states.pt"),
                                         ("zero3_lora", "zero_pp_rank_0_mp_rank_00_optim_states.pt"),
                                         ("zero2", "rng_state_rank0.pt")])
def test_a_tampered_checkpoint_is_refused_on_resume(stopped, tmp_path, layout, name):
    """DeepSpeed's own loader unpickles these files with weights_only=False: the planted command would run."""
    run_dir, marker = copy_of(stopped(layout), tmp_path / "run"), tmp_path / "pwned"
    evil = run_dir / "checkpoints" / "step-1" / name
    assert evil.exists()
    plant_pickle(evil, marker)
    proc = train_single([*TWO, *LAYOUTS[layout], f"output_dir={run_dir}"], check=False)
    assert proc.returncode != 0 and not marker.exists()
    assert f"sftdist: error: refusing to load {evil}: it is not only tensors" in proc.stderr
    assert "posix.system" in proc.stderr and "resumed from" not in proc.stdout


def test_universal_conversion_runs_under_the_guard(stopped, tmp_path):
    """ds_to_universal (another world size resumes through it) loads every shard with weights_only=False."""
    from sftdist.lifecycle.checkpoint import universal_checkpoint
    from sftdist.lifecycle.safe_load import UnsafeCheckpointError

    good = copy_of(stopped("zero2"), tmp_path / "good") / "checkpoints" / "step-1"
    out = universal_checkpoint(good)
    assert (out / "trainer_state.json").exists() and (out / "zero" / "optimizer_state.pt").exists()
    bad, marker = copy_of(stopped("zero2"), tmp_path / "bad") / "checkpoints" / "step-1", tmp_path / "pwned"
    plant_pickle(bad / "zero_pp_rank_0_mp_rank_00_optim_states.pt", marker)
    with pytest.raises(UnsafeCheckpointError, match="refusing to load .*optim_states.pt"):
        universal_checkpoint(bad)
    assert not marker.exists() and not bad.with_name("step-1.universal").exists()
