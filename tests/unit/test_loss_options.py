"""The loss options (``train.loss_normalization``, ``train.loss``, ``train.neftune_alpha``) against
hand-computed values: per-sample weighting on a packed batch over 2 ranks x 2 micro-batches and cut along
the sequence, the loop's own step with those weights, DFT's value and gradient, NEFTune noise only in
training forwards, and the three keys in the resume check's run identity."""

from types import SimpleNamespace

import pytest
import torch

from sftdist.config import ConfigError, ModelConfig, SFTConfig, TrainConfig
from sftdist.data.collate import collate_packed
from sftdist.data.tokenize import IGNORE_INDEX
from sftdist.engine import forward
from sftdist.engine.forward import LossHead, at_supervised, neftune, neftune_noise, supervised_index
from sftdist.engine.loss import (
    backward_scale,
    dft,
    loss_denominator,
    supervised_samples,
    token_cross_entropy,
    token_weights,
)
from sftdist.observe.step_metrics import batch_counts

# Each sample's per-token losses, one per supervised position; [] is a sample with nothing supervised (a
# truncated reply), which counts in neither denominator. Rank r, micro-batch m: rows of packed samples.
LOSSES = {
    "A": [1.0, 2.0, 3.0], "B": [4.0], "C": [1.0, 3.0], "D": [], "E": [1.0, 1.0, 1.0, 1.0, 6.0],
    "F": [0.5], "G": [1.0, 2.0, 3.0, 6.0], "H": [2.0, 4.0], "I": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
}
LAYOUT = [  # [rank][micro-batch] -> rows of sample names
    [[["A", "B"], ["C"]], [["D", "E"]]],
    [[["F", "G"], ["H"]], [["I"]]],
]


def example(name: str) -> dict:
    """A prompt token, then one supervised label per loss: n + 1 tokens whose shifted targets hold n."""
    n = len(LOSSES[name])
    return {"input_ids": list(range(1, n + 2)), "labels": [IGNORE_INDEX] + list(range(1, n + 1))}


def micro_batch(rows: list[list[str]]) -> tuple[dict, torch.Tensor]:
    """The collated micro-batch and its supervised positions' losses, in row-major order (a leaf)."""
    batch = collate_packed([[example(name) for name in row] for row in rows], pad_id=0)
    losses = [v for row in rows for name in row for v in LOSSES[name]]
    return batch, torch.tensor(losses, requires_grad=True)


def hand_mean_of_sample_means() -> float:
    means = [sum(v) / len(v) for v in LOSSES.values() if v]
    return sum(means) / len(means)


def step(normalization: str, transform=lambda x: x) -> tuple[float, list[torch.Tensor]]:
    """The applied loss and each token loss's gradient, as the loop computes them and DeepSpeed applies them:
    weights from each whole micro-batch, one all-reduce of the counts, every micro loss divided by the
    accumulation steps, gradients averaged over the ranks."""
    ranks = [[micro_batch(rows) for rows in rank] for rank in LAYOUT]
    counts = [sum(c) for c in zip(*(batch_counts([b for b, _ in rank]) for rank in ranks))]  # the all-reduce
    denominator = loss_denominator(normalization, supervised_tokens=counts[0], supervised_samples=counts[4])
    grad_accum, world = 2, 2
    scale = backward_scale(denominator, grad_accum, world)
    applied = 0.0
    for rank in ranks:
        for batch, losses in rank:
            mask = batch["targets"] != IGNORE_INDEX
            micro = (transform(losses) * token_weights(batch, normalization)[mask]).sum() * scale / grad_accum
            (micro / world).backward()
            applied += float(micro.detach()) / world
    return applied, [losses.grad for rank in ranks for _, losses in rank]


def test_sequence_normalization_is_the_mean_of_per_sample_means_over_ranks_and_micro_batches():
    applied, grads = step("sequence")
    assert applied == pytest.approx(hand_mean_of_sample_means())  # (2 + 4 + 2 + 2 + 0.5 + 3 + 3 + 3.5) / 8
    assert applied == pytest.approx(2.5)
    # every token of a sample with n supervised tokens gets 1 / (8 samples * n)
    expected = [1 / (8 * len(LOSSES[name])) for rank in LAYOUT for rows in rank for row in rows
                for name in row for _ in LOSSES[name]]
    torch.testing.assert_close(torch.cat(grads), torch.tensor(expected))


def test_token_normalization_is_the_global_token_mean():
    applied, grads = step("token")
    every = [v for v in LOSSES.values() for v in v]
    assert applied == pytest.approx(sum(every) / len(every))
    torch.testing.assert_close(torch.cat(grads), torch.full((len(every),), 1 / len(every)))


def test_token_weights_and_sample_counts_of_a_packed_batch():
    batch, _ = micro_batch([["A", "B"], ["D", "E"]])
    assert batch["sample_index"].tolist() == [[0, 0, 0, 0, 1, 1, -1], [2, 3, 3, 3, 3, 3, 3]]
    w = token_weights(batch, "sequence")
    assert w.dtype == torch.float32 and w.shape == batch["targets"].shape
    third, fifth = pytest.approx(1 / 3), pytest.approx(1 / 5)
    assert w[0].tolist() == [third, third, third, 0.0, 1.0, 0.0, 0.0]
    assert w[1].tolist() == [0.0, fifth, fifth, fifth, fifth, fifth, 0.0]
    assert supervised_samples(batch) == 3  # D has no supervised target
    assert token_weights(batch, "token").tolist() == [[1.0] * 7] * 2


def test_sequence_weights_hold_when_a_sample_is_cut_along_the_sequence():
    """Sequence parallelism cuts every [B, T] tensor along T and each rank sums its slice: the weights,
    computed on the whole micro-batch first, give the same sum; computed per slice they would not."""
    batch, losses = micro_batch([["A", "E"], ["I"]])  # T = 10: E and I are cut at 5
    batch["loss_weight"] = token_weights(batch, "sequence")
    position_losses = torch.zeros(batch["targets"].shape)
    position_losses[batch["targets"] != IGNORE_INDEX] = losses.detach()
    whole = (position_losses * batch["loss_weight"]).sum()
    assert float(whole) == pytest.approx(2 + 2 + 3.5)
    width = batch["targets"].shape[1]
    assert width == 10
    halves = [{k: v[:, a:b] for k, v in batch.items()} for a, b in ((0, width // 2), (width // 2, width))]
    cut = [position_losses[:, a:b] for a, b in ((0, width // 2), (width // 2, width))]
    assert all(supervised_samples(h) for h in halves)  # both halves hold part of E and of I
    sliced = sum(float((loss * h["loss_weight"])[h["targets"] != IGNORE_INDEX].sum())
                 for h, loss in zip(halves, cut))
    assert sliced == pytest.approx(float(whole))
    per_slice = sum(float((loss * token_weights(h, "sequence")).sum()) for h, loss in zip(halves, cut))
    assert per_slice != pytest.approx(float(whole))


def test_dft_value_and_gradient_by_hand():
    # softmax rows [1/4, 1/4, 1/2] (target 2: p = 1/2) and [1/8, 1/8, 3/4] (target 0: p = 1/8)
    logits = torch.log(torch.tensor([[1.0, 1.0, 2.0], [1.0, 1.0, 6.0]]))
    targets = torch.tensor([2, 0])
    for ce in (token_cross_entropy, lambda x, t: torch.nn.functional.cross_entropy(x, t, reduction="none")):
        x = logits.clone().requires_grad_()
        out = dft(ce(x * 1, targets))
        torch.testing.assert_close(out.detach(), torch.tensor([0.5 * 0.6931472, 0.125 * 2.0794415]))
        out.sum().backward()
        # d/dlogits = p (detached) * (softmax - onehot)
        expected = [[0.125, 0.125, -0.25], [-0.109375, 0.015625, 0.09375]]
        torch.testing.assert_close(x.grad, torch.tensor(expected))
    losses = torch.tensor([0.3, 2.0])
    assert torch.equal(LossHead(loss="dft").objective(losses), dft(losses))
    assert LossHead().objective(losses) is losses
    assert not LossHead().reweighted and LossHead(loss="dft").reweighted
    assert LossHead(normalization="sequence").reweighted


def test_dft_and_sequence_combine_as_the_mean_of_per_sample_dft_means():
    applied, _ = step("sequence", dft)
    means = [sum(x * torch.exp(torch.tensor(-x)).item() for x in v) / len(v) for v in LOSSES.values() if v]
    assert applied == pytest.approx(sum(means) / len(means))


def optimizer_step_parts(head: LossHead, rows: list[list[list[str]]]):
    """``LoopParts`` stand-ins for one rank's ``optimizer_step``: a token's loss is its own parameter, so its
    gradient is its weight in the step's objective; DeepSpeed's engine divides by the accumulation steps."""
    from sftdist import loop

    batches = [micro_batch(r)[0] for r in rows]
    losses = torch.tensor([v for r in rows for row in r for name in row for v in LOSSES[name]])
    losses.requires_grad_()
    start = 0
    for b in batches:  # each supervised position's index into ``losses``
        mask = b["targets"] != IGNORE_INDEX
        b["token_id"] = torch.full(b["targets"].shape, -1)
        b["token_id"][mask] = torch.arange(start, start + int(mask.sum()))
        start += int(mask.sum())

    class TokenLosses(LossHead):
        def losses(self, model, batch):
            index = supervised_index(batch)
            return model.w[at_supervised(batch["token_id"], index)], index

    engine = SimpleNamespace(
        w=losses, zero_optimization_stage=lambda: 2, gradient_accumulation_steps=lambda: len(rows),
        get_lr=lambda: [1e-3], backward=lambda x: (x / len(rows)).backward(), step=lambda: None,
        is_gradient_accumulation_boundary=lambda: True, get_global_grad_norm=lambda: 1.0)
    parts = SimpleNamespace(
        engine=engine, data=SimpleNamespace(sources=["chat"], names=["chat"]), pad_id=0,
        batches=SimpleNamespace(micro_batches=lambda step: batches),
        head=TokenLosses(loss=head.loss, normalization=head.normalization), meter=SimpleNamespace(
            metrics=lambda **kw: {}), guard=SimpleNamespace(skips=False))
    return loop, parts, losses


@pytest.mark.parametrize("loss", ["ce", "dft"])
def test_the_loops_step_logs_cross_entropy_and_trains_the_per_sample_objective(loss):
    rows = LAYOUT[0] + LAYOUT[1]  # one rank, 4 micro-batches
    head = LossHead(loss=loss, normalization="sequence")
    loop, parts, losses = optimizer_step_parts(head, rows)
    row, _, _ = loop.optimizer_step(parts, 0, lambda seconds: False)
    every = [v for v in LOSSES.values() for v in v]
    assert row["loss"] == pytest.approx(sum(every) / len(every))  # the token-mean cross-entropy, as ever
    assert row["loss/chat"] == pytest.approx(row["loss"])
    sizes = [len(LOSSES[name]) for r in rows for row_ in r for name in row_ for _ in LOSSES[name]]
    prob = torch.exp(-losses.detach()) if loss == "dft" else torch.ones(len(every))
    torch.testing.assert_close(losses.grad, prob / (8 * torch.tensor(sizes, dtype=torch.float32)))
    assert row["objective"] == pytest.approx(float((losses.detach() * losses.grad).sum()))


def test_the_loops_default_step_logs_no_objective():
    loop, parts, losses = optimizer_step_parts(LossHead(), [[["A", "B"]], [["C"]]])
    row, _, _ = loop.optimizer_step(parts, 0, lambda seconds: False)
    assert "objective" not in row and row["loss"] == pytest.approx(14 / 6)
    torch.testing.assert_close(losses.grad, torch.full((6,), 1 / 6))


def tiny_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                        use_cache=False))


def embedding_seen_by_layers(model, ids: torch.Tensor, **generate) -> list[torch.Tensor]:
    """What the decoder layers get from the embedding (after any noise), on each forward."""
    seen = []
    bare = model.get_base_model() if hasattr(model, "get_base_model") else model
    layer = bare.model.layers[0]
    handle = layer.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs.get(
        "hidden_states", args[0] if args else None).detach().clone()), with_kwargs=True)
    try:
        if generate:
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, **generate)
        else:
            model(input_ids=ids)
    finally:
        handle.remove()
    return seen


@pytest.mark.parametrize("lora", [False, True])
def test_neftune_noise_only_in_training_forwards(lora):
    model = tiny_model()
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj", "embed_tokens"]))
    ids = torch.randint(1, 50, (2, 12))
    model.train()
    clean = embedding_seen_by_layers(model, ids)[0]
    alpha, bound = 5.0, 5.0 / (12 * 16) ** 0.5
    with neftune(model, alpha, 12):
        noisy = embedding_seen_by_layers(model, ids)[0]
    noise = (noisy - clean).abs()
    assert 0 < noise.max() <= bound and noise.max() > 0.9 * bound  # uniform in [-bound, bound]
    assert torch.equal(embedding_seen_by_layers(model, ids)[0], clean)  # the hook left with the block
    with neftune(model, 0.0, 12):
        assert torch.equal(embedding_seen_by_layers(model, ids)[0], clean)
    model.eval()  # eval passes and generation run in eval mode
    with neftune(model, alpha, 12):
        assert torch.equal(embedding_seen_by_layers(model, ids)[0], clean)
        with torch.no_grad():
            generated = embedding_seen_by_layers(model, ids[:1], max_new_tokens=2)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(generated, embedding_seen_by_layers(
            model, ids[:1], max_new_tokens=2)))


def test_loss_head_adds_noise_scaled_by_the_whole_rows_width(monkeypatch):
    model = tiny_model()
    batch = collate_packed([[example("A"), example("E")], [example("I")]], pad_id=0)  # width 10
    plain = LossHead(mode="full")
    noisy = LossHead(mode="full", neftune_alpha=5.0)
    model.train()
    assert not torch.equal(noisy.losses(model, batch)[0], plain.losses(model, batch)[0])
    model.eval()  # an eval pass: the noise-free cross-entropy
    assert torch.equal(noisy.losses(model, batch)[0], plain.losses(model, batch)[0])
    lengths = []
    monkeypatch.setattr(forward, "neftune_noise", lambda e, a, length: lengths.append(length) or e)
    # (the embedding alone: a sharded batch's forward needs the sequence-parallel groups)
    monkeypatch.setattr(forward, "supervised_losses",
                        lambda m, b, **kw: (m.get_input_embeddings()(b["input_ids"]), None))
    model.train()
    noisy.losses(model, batch)
    half = {k: v[:, 5:] for k, v in batch.items()}  # a sequence-parallel slice keeps its rows' positions
    half[forward.sequence_parallel.FULL_POSITIONS] = batch["position_ids"]
    noisy.losses(model, half)
    assert lengths == [10, 10]


def test_neftune_noise_repeats_after_the_checkpointed_rng_state_is_restored():
    from sftdist.lifecycle.checkpoint import rng_state, set_rng_state

    state = rng_state()
    first = neftune_noise(torch.zeros(2, 8, 16), 5.0, 8)
    set_rng_state(state)
    assert torch.equal(neftune_noise(torch.zeros(2, 8, 16), 5.0, 8), first)


def test_loss_options_are_checked_and_part_of_the_run_identity(monkeypatch):
    from sftdist.lifecycle import resume_check

    for bad, message in (({"loss": "focal"}, "train.loss='focal' is not one of"),
                         ({"loss_normalization": "sample"}, "train.loss_normalization='sample' is not"),
                         ({"neftune_alpha": -1.0}, "train.neftune_alpha=-1.0 must be >= 0"),
                         ({"neftune_alpha": float("nan")}, "train.neftune_alpha=nan")):
        with pytest.raises(ConfigError, match=message):
            TrainConfig(**bad)
    monkeypatch.setattr(resume_check, "tokenizer_fingerprint", lambda tokenizer: "tok")
    model = ModelConfig(tokenizer="t", from_config={"model_type": "llama", "hidden_size": 16})
    saved = resume_check.run_settings(SFTConfig(model=model), None)
    assert {k: saved[k] for k in ("train.loss", "train.loss_normalization", "train.neftune_alpha")} == {
        "train.loss": "ce", "train.loss_normalization": "token", "train.neftune_alpha": 0.0}
    for change in ({"loss": "dft"}, {"loss_normalization": "sequence"}, {"neftune_alpha": 5.0}):
        now = resume_check.run_settings(SFTConfig(model=model, train=TrainConfig(**change)), None)
        key = f"train.{next(iter(change))}"
        with pytest.raises(ConfigError, match=key):
            resume_check.check_unchanged(saved, now, checkpoint="ck", allow=False)
