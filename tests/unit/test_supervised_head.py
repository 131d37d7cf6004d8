"""The LM head at supervised positions only (sftdist/engine/forward.py): the same token losses and the same gradients
as the model's full logits, for padded and packed batches, with LoRA, with several chunks (recomputed in
backward), and for models that transform their logits after the head; and the check that catches a head
that does not match."""

import pytest
import torch

from sftdist.data.collate import collate, collate_packed
from sftdist.data.tokenize import IGNORE_INDEX
from sftdist.engine.forward import check_supervised_head, forward_logits, head_logits, supervised_losses


def tiny_model(model_type: str = "llama", attn: str = "sdpa", **extra):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, vocab_size=97, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=128, **extra)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=torch.float32)


def samples(n: int = 4, seed: int = 1) -> list[dict]:
    """Random samples with a prompt (unsupervised) and a reply (supervised) of random lengths."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        prompt, reply = int(torch.randint(2, 9, (1,), generator=g)), int(torch.randint(1, 7, (1,), generator=g))
        ids = torch.randint(1, 97, (prompt + reply,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:], "source": 0})
    return out


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def losses_and_grads(model, batch, **kw):
    model.zero_grad()
    losses, mask = supervised_losses(model, batch, **kw)
    losses.sum().backward()
    return losses.detach(), mask, grads(model)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("chunk_tokens", [8192, 3])
def test_supervised_head_matches_full_logits(packed, chunk_tokens):
    model = tiny_model()
    rows = samples(6)
    batch = collate_packed([rows[:3], rows[3:]], 0) if packed else collate(rows, 0)
    ref, ref_mask, ref_grads = losses_and_grads(model, batch, lm_head="full")
    got, mask, got_grads = losses_and_grads(model, batch, lm_head="supervised", chunk_tokens=chunk_tokens)
    assert torch.equal(mask, ref_mask) and got.shape == (mask.numel(),)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    assert got_grads.keys() == ref_grads.keys() and "lm_head.weight" in got_grads
    for name in ref_grads:
        torch.testing.assert_close(got_grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_supervised_head_with_lora_on_the_head():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"],
                                                    init_lora_weights=False))
    batch = collate(samples(3), 0)
    ref, _, ref_grads = losses_and_grads(model, batch, lm_head="full")
    got, _, got_grads = losses_and_grads(model, batch, lm_head="supervised")
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    assert any("lm_head.lora" in n for n in got_grads)  # the adapter on the head is trained
    for name in ref_grads:
        torch.testing.assert_close(got_grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("model_type, extra", [
    ("gemma2", {"final_logit_softcapping": 0.5, "head_dim": 8}),  # soft-capped logits
    ("granite", {"logits_scaling": 4.0}),  # divided logits
    ("cohere", {"logit_scale": 0.25}),  # multiplied logits
])
def test_post_head_transforms_are_applied(model_type, extra):
    model = tiny_model(model_type, attn="eager", **extra)
    batch = collate(samples(3), 0)
    mask = batch["targets"] != IGNORE_INDEX
    with torch.no_grad():
        full = forward_logits(model, batch)[mask].float()
        raw = model.get_output_embeddings()(model.get_decoder()(input_ids=batch["input_ids"],
                                                                 attention_mask=batch["attention_mask"]
                                                                 ).last_hidden_state[mask]).float()
        ref, _ = supervised_losses(model, batch, lm_head="full")
        got, _ = supervised_losses(model, batch)
    assert (raw - full).abs().max() > 1e-2  # the transform matters for this model...
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)  # ...and the supervised head applies it
    assert check_supervised_head(model, batch) is None


def test_check_catches_a_head_that_differs():
    model = tiny_model()
    batch = collate(samples(3), 0)
    assert check_supervised_head(model, batch) is None
    model.config.logits_scaling = 8.0  # the head now scales logits that the model's forward does not
    problem = check_supervised_head(model, batch)
    assert problem is not None and "differ" in problem


def test_head_logits_are_fp32_for_a_bf16_model():
    model = tiny_model().to(torch.bfloat16)
    assert head_logits(model, torch.randn(5, 32, dtype=torch.bfloat16)).dtype == torch.float32


def test_the_check_runs_on_one_row_prefix_not_the_whole_batch(monkeypatch):
    """The model's own forward materialises [B, T, V] logits: the start-up check gives it one row cut after
    the first supervised positions, not the micro-batch, and still catches a head that differs (#11)."""
    import sftdist.engine.forward as forward

    model = tiny_model()
    batch = collate(samples(4), 0)
    seen = []
    real = forward.forward_logits
    monkeypatch.setattr(forward, "forward_logits", lambda m, b: seen.append(tuple(b["input_ids"].shape)) or real(m, b))
    assert check_supervised_head(model, batch) is None
    (shape,) = seen
    rows, width = batch["input_ids"].shape
    assert shape[0] == 1 and shape[1] <= width and shape[0] * shape[1] < rows * width
    model.config.logits_scaling = 8.0
    assert "differ" in check_supervised_head(model, batch)
