"""The same global batch as 1 micro-batch, as 4 micro-batches with gradient accumulation, and over 2 ranks
gives the same per-step losses and the same trained weights, under every ZeRO stage: the loss is normalised
by the global number of supervised tokens, through a real DeepSpeed engine and a real gloo all-reduce. The
stages also agree with each other (ZeRO-2 is the reference), up to their different reduction orders.

ZeRO-3 runs load the tiny model's initial weights from a ``save_pretrained`` copy instead of building it from
the config: that is the path on which the model is created already partitioned (``deepspeed.zero.Init``), the
one a real fine-tuning run takes, and it starts exactly where the other stages start."""

import json

import pytest
from safetensors.torch import load_file

from tests.conftest import read_metrics

LAYOUTS = {  # name: (processes, micro_batch_size); global batch 8 in every case
    "single_ga1": (0, 8),
    "single_ga4": (0, 2),
    "torchrun2_ga2": (2, 2),
}
STAGES = (0, 1, 2, 3)
REFERENCE_STAGE = 2


@pytest.fixture(scope="module")
def initial():
    """The tiny model exactly as every from-config run initialised it (same config, same seed)."""
    from sftdist.config import compose_config
    from sftdist.engine.model import build_model, load_tokenizer

    cfg = compose_config([])
    return build_model(cfg.model, load_tokenizer(cfg.model), precision="fp32", activation_checkpointing=False,
                       seed=cfg.train.seed)


@pytest.fixture(scope="module")
def initial_weights(initial):
    return {k: v.detach().clone() for k, v in initial.state_dict().items()}


@pytest.fixture(scope="module")
def initial_dir(initial, tmp_path_factory):
    """A Hugging Face directory holding the initial weights (for the ZeRO-3 runs)."""
    path = tmp_path_factory.mktemp("tiny_init")
    initial.save_pretrained(path, safe_serialization=True)
    return path


def named_init(initial_dir) -> list[str]:
    """Load the from-config runs' initial weights by name (the ZeRO-3 runs), at their lr: a named model's
    default lr is full fine-tuning's 2e-5, the from-config runs' 3e-3 (schema.default_lr)."""
    return [f"model.name_or_path={initial_dir}", "model.from_config=null", "train.lr=3e-3"]


def stage_runs(trained_runs, stage: int, initial_dir) -> dict:
    """Run directories of every layout under ZeRO-``stage`` (trained once per session)."""
    if stage == REFERENCE_STAGE:
        # The default stage, under the names the smoke tests use for the same runs.
        suffix, extra = "", []
    else:
        suffix, extra = f"_zero{stage}", [f"parallelism=zero{stage}"]
    if stage == 3:
        extra += named_init(initial_dir)
    return {name: trained_runs(name + suffix, nproc, [*extra, *([] if micro == 2 else
                                                                 [f"train.micro_batch_size={micro}"])])
            for name, (nproc, micro) in LAYOUTS.items()}


def assert_weights_close(weights: dict, ref: dict, init: dict, *, tol: float, what: str) -> None:
    assert weights.keys() == ref.keys(), what
    for key, value in ref.items():
        # Compare what training changed: Adam's normalisation turns float noise in near-zero gradients into
        # ~1e-5 absolute differences, so the test bounds the difference relative to the update.
        update = (value - init[key]).norm()
        assert update > 0, f"{what}: {key} did not train"
        assert (weights[key] - value).norm() / update < tol, f"{what}: {key}"


@pytest.mark.parametrize("stage", STAGES, ids=[f"zero{s}" for s in STAGES])
def test_losses_and_weights_match_across_layouts(trained_runs, stage, initial_weights, initial_dir):
    dirs = stage_runs(trained_runs, stage, initial_dir)
    for name, run_dir in dirs.items():
        ds_config = json.loads((run_dir / "ds_config.json").read_text())
        assert ds_config["zero_optimization"]["stage"] == stage, name
    ref = read_metrics(dirs["single_ga1"])
    ref_weights = load_file(dirs["single_ga1"] / "final" / "model.safetensors")
    # ZeRO-3's export is the gathered "16-bit" state dict; in an fp32 run it must stay fp32.
    assert {str(v.dtype) for v in ref_weights.values()} == {"torch.float32"}
    for name in ("single_ga4", "torchrun2_ga2"):
        got = read_metrics(dirs[name])
        assert [r["supervised_tokens"] for r in got] == [r["supervised_tokens"] for r in ref]
        assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in ref], rel=1e-5), name
        assert [r["grad_norm"] for r in got] == pytest.approx([r["grad_norm"] for r in ref], rel=1e-4), name
        weights = load_file(dirs[name] / "final" / "model.safetensors")
        assert_weights_close(weights, ref_weights, initial_weights, tol=2e-4, what=f"zero{stage} {name}")
    assert ref[-1]["loss"] < ref[0]["loss"]


@pytest.mark.parametrize("stage", [s for s in STAGES if s != REFERENCE_STAGE], ids=lambda s: f"zero{s}")
def test_stages_agree_with_zero2(trained_runs, stage, initial_weights, initial_dir):
    dirs = stage_runs(trained_runs, stage, initial_dir)
    ref_dirs = stage_runs(trained_runs, REFERENCE_STAGE, initial_dir)
    for name in LAYOUTS:
        ref, got = read_metrics(ref_dirs[name]), read_metrics(dirs[name])
        assert [r["supervised_tokens"] for r in got] == [r["supervised_tokens"] for r in ref], name
        # Same arithmetic, different reduction order (flat buckets, partitions): float noise only.
        assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in ref], rel=1e-5), name
        assert_weights_close(load_file(dirs[name] / "final" / "model.safetensors"),
                             load_file(ref_dirs[name] / "final" / "model.safetensors"), initial_weights,
                             tol=2e-4, what=f"zero{stage} vs zero{REFERENCE_STAGE} {name}")


@pytest.mark.parametrize("stage", STAGES, ids=[f"zero{s}" for s in STAGES])
def test_grad_norm_is_logged(trained_runs, stage, initial_dir):
    run_dir = stage_runs(trained_runs, stage, initial_dir)["torchrun2_ga2"]
    assert all(r["grad_norm"] is not None and r["grad_norm"] > 0 for r in read_metrics(run_dir))


@pytest.mark.parametrize("stage, head", [(3, "train.lm_head=full"), (3, "train.loss_chunk_tokens=16"),
                                         (2, "train.loss_chunk_tokens=16")], ids=["zero3-full", "zero3-chunked",
                                                                                  "zero2-chunked"])
def test_lm_head_modes_agree(trained_runs, stage, head, initial_weights, initial_dir):
    """On 2 ranks, the supervised head (default) vs all logits, and vs chunks of 16 supervised positions
    whose logits are recomputed in backward (ZeRO-2). Under ZeRO-3 the head's weight is a partition that
    each head call gathers, so there a micro-batch goes through the head in one call whatever the chunk
    size: ranks whose chunk counts differ would otherwise hang in the gather."""
    ref_dir = stage_runs(trained_runs, stage, initial_dir)["torchrun2_ga2"]
    extra = named_init(initial_dir) if stage == 3 else []
    got_dir = trained_runs(f"torchrun2_ga2_zero{stage}_{head.split('=')[0][6:]}", 2,
                           [f"parallelism=zero{stage}", *extra, head])
    assert "does not fit this model" not in (got_dir / "stdout.txt").read_text()
    ref, got = read_metrics(ref_dir), read_metrics(got_dir)
    assert [r["supervised_tokens"] for r in got] == [r["supervised_tokens"] for r in ref]
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in ref], rel=1e-5)
    assert [r["eval_loss"] for r in got if "eval_loss" in r] == pytest.approx(
        [r["eval_loss"] for r in ref if "eval_loss" in r], rel=1e-5)
    assert_weights_close(load_file(got_dir / "final" / "model.safetensors"),
                         load_file(ref_dir / "final" / "model.safetensors"), initial_weights, tol=2e-4,
                         what=head)
