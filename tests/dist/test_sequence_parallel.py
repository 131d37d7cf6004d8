"""Sequence parallelism (``parallelism.sequence_parallel_size=2``) on 2 CPU ranks trains what one process
trains on the same packed global batch: the same per-step losses, grad norms and eval losses, and the same
weights, under ZeRO-1 (with LoRA and per-sample loss weights), ZeRO-2 and ZeRO-3, through real DeepSpeed
engines, DeepSpeed's Ulysses attention and gloo all-to-alls. Each SP rank holds half of every packed row, so
documents are cut across ranks and attention by document must still see whole documents.

A run resumed from step 2 with SP=2 continues exactly; a resume with another SP size is refused before the
model loads."""

import pytest
from safetensors.torch import load_file

from sftdist.config import ConfigError
from sftdist.lifecycle.startup import check_zero_stage
from tests.conftest import FAST, read_metrics, train_torchrun
from tests.dist.test_loss_equivalence import assert_weights_close

PACKED = ["data.packing=true"]
SP2 = ["parallelism.sequence_parallel_size=2"]
ZERO3 = ["parallelism=zero3", "train.save_every=2"]  # (its step-2 checkpoint is the resume test's)
LORA = ["peft=lora", "peft.dropout=0", "train.lr=3e-3"]  # (no dropout: its masks depend on the layout)


def run(trained_runs, name: str, nproc: int, extra: list[str]):
    return trained_runs(f"sp_{name}", nproc, [*PACKED, *extra])


@pytest.fixture(scope="module")
def initial_weights():
    from sftdist.config import compose_config
    from sftdist.engine.model import build_model, load_tokenizer

    cfg = compose_config([])
    model = build_model(cfg.model, load_tokenizer(cfg.model), precision="fp32", activation_checkpointing=False,
                        seed=cfg.train.seed)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_training(got_dir, ref_dir, initial, *, what: str, weights: str = "model.safetensors"):
    ref, got = read_metrics(ref_dir, baseline=True), read_metrics(got_dir, baseline=True)
    assert [r["step"] for r in got] == [r["step"] for r in ref], what
    train_rows = [r for r in ref if r["step"] > 0]
    assert [r["supervised_tokens"] for r in got if r["step"] > 0] == [r["supervised_tokens"] for r in train_rows]
    assert [r["tokens"] for r in got if r["step"] > 0] == [r["tokens"] for r in train_rows], what
    assert [r["loss"] for r in got if r["step"] > 0] == pytest.approx([r["loss"] for r in train_rows], rel=1e-5)
    assert [r["grad_norm"] for r in got if r["step"] > 0] == pytest.approx(
        [r["grad_norm"] for r in train_rows], rel=1e-4), what
    assert [r["eval_loss"] for r in got if "eval_loss" in r] == pytest.approx(
        [r["eval_loss"] for r in ref if "eval_loss" in r], rel=1e-5), what
    assert any("eval_loss" in r for r in ref), "the runs evaluate"
    if initial is not None:
        assert_weights_close(load_file(got_dir / "final" / weights), load_file(ref_dir / "final" / weights),
                             initial, tol=2e-4, what=what)


@pytest.mark.parametrize("stage", [2, 3], ids=["zero2", "zero3"])
def test_sp2_trains_what_one_process_trains(trained_runs, initial_weights, stage):
    ref = run(trained_runs, "single", 0, [])
    got = run(trained_runs, f"sp2_zero{stage}", 2, [*SP2, *(ZERO3 if stage == 3 else ["parallelism=zero2"])])
    log = (got / "stdout.txt").read_text()
    assert "1 data-parallel group(s) of 2 sequence-parallel ranks x 2 micro-batch x 4 accumulation" in log
    assert_same_training(got, ref, initial_weights, what=f"SP=2 ZeRO-{stage}")
    assert read_metrics(ref)[-1]["loss"] < read_metrics(ref)[0]["loss"]


def test_sp2_lora_zero1_per_sample_loss(trained_runs):
    """LoRA under ZeRO-1, with each sample weighted equally (train.loss_normalization=sequence): the weights
    come from whole samples, also where the split cuts one."""
    extra = [*LORA, "parallelism=zero1", "train.loss_normalization=sequence"]
    ref = run(trained_runs, "single_lora", 0, extra)
    got = run(trained_runs, "sp2_lora_zero1", 2, [*SP2, *extra])
    assert [r["objective"] for r in read_metrics(got)] == pytest.approx(
        [r["objective"] for r in read_metrics(ref)], rel=1e-5)
    adapter_ref = load_file(ref / "final" / "adapter_model.safetensors")
    adapter_got = load_file(got / "final" / "adapter_model.safetensors")
    assert_same_training(got, ref, None, what="SP=2 LoRA ZeRO-1")
    lora_b = [k for k in adapter_ref if "lora_B" in k]
    assert lora_b and all(adapter_ref[k].abs().max() > 0 for k in lora_b), "the adapter trained"
    # lora_B starts at zero, so each is its own update: bounded relative to it, as assert_weights_close does.
    for key in lora_b:
        assert (adapter_got[key] - adapter_ref[key]).norm() / adapter_ref[key].norm() < 2e-4, key


def test_sp2_resumes_exactly_and_refuses_another_size(trained_runs, tmp_path):
    """The uninterrupted ZeRO-3 run also checkpointed step 2: a new process resumes from it (SP=2 again) and
    trains step 3 exactly as the uninterrupted run did. The same checkpoint is refused, before anything is
    built, for one process without SP (run() makes this check first)."""
    whole = run(trained_runs, "sp2_zero3", 2, [*SP2, *ZERO3])
    step2 = whole / "checkpoints" / "step-2"
    with pytest.raises(ConfigError, match=r"parallelism.sequence_parallel_size: 2 -> 1: .* written with "
                                          r"sequence_parallel_size=2 on 2 process"):
        check_zero_stage(step2, 3, 1)
    run_dir = tmp_path / "resumed"
    train_torchrun(2, [*FAST, *PACKED, *SP2, *ZERO3, f"train.resume={step2}", f"output_dir={run_dir}"])
    resumed, ref = read_metrics(run_dir), read_metrics(whole)
    assert [r["step"] for r in resumed] == [3]  # this process trained step 3 alone
    assert [r["loss"] for r in resumed] == [ref[-1]["loss"]]
    assert [r["grad_norm"] for r in resumed] == [ref[-1]["grad_norm"]]
    a, b = load_file(run_dir / "final" / "model.safetensors"), load_file(whole / "final" / "model.safetensors")
    assert all(a[k].equal(b[k]) for k in b)
