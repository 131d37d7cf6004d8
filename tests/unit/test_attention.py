"""Attention by document (sftdist/engine/attention.py): the same logits and gradients as transformers' own sdpa with
its block-diagonal masks, for packed and padded batches and GQA; which models get it; and a cached forward
(generation) falls through to plain sdpa."""

import doctest

import pytest
import torch
import torch.nn.functional as F

import sftdist.engine.attention
from sftdist.data.collate import collate, collate_packed
from sftdist.data.tokenize import IGNORE_INDEX
from sftdist.engine import attention
from sftdist.engine.forward import forward_logits, supervised_losses


def tiny(model_type="llama", **extra):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, vocab_size=97, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=128, **extra)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)


def samples(n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(3, 14, (1,), generator=g))
        ids = torch.randint(1, 97, (length,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * 2 + ids[2:]})
    return out


def losses_and_grads(model, batch):
    model.zero_grad()
    losses, _ = supervised_losses(model, batch)
    losses.sum().backward()
    return losses.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded"])
def test_by_document_equals_masked_sdpa(packed):
    attention.register()
    model = tiny()
    rows = samples()
    batch = collate_packed([rows[:2], rows[2:5], rows[5:]], 0) if packed else collate(rows, 0)
    ref, ref_grads = losses_and_grads(model, batch)
    model.set_attn_implementation(attention.NAME)
    got, grads = losses_and_grads(model, batch)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_a_document_never_sees_another():
    """Changing one packed document leaves the logits of the others in its row untouched."""
    attention.register()
    model = tiny()
    model.set_attn_implementation(attention.NAME)
    rows = samples(3)
    changed = [dict(rows[0], input_ids=[5] * len(rows[0]["input_ids"])), rows[1], rows[2]]
    with torch.no_grad():
        a = forward_logits(model, collate_packed([rows], 0))
        b = forward_logits(model, collate_packed([changed], 0))
    first = len(rows[0]["input_ids"])
    torch.testing.assert_close(a[0, first:], b[0, first:], rtol=0, atol=1e-6)
    assert (a[0, :first] - b[0, :first]).abs().max() > 1e-3


def test_generation_with_a_cache_falls_through_to_sdpa():
    attention.register()
    model = tiny()
    prompt = torch.tensor([[3, 4, 5, 6]])
    want = model.generate(prompt, max_new_tokens=5, do_sample=False, use_cache=True)
    model.set_attn_implementation(attention.NAME)
    assert torch.equal(model.generate(prompt, max_new_tokens=5, do_sample=False, use_cache=True), want)


def test_which_models_fit():
    assert attention.fits(tiny().config, 512)
    assert attention.fits(tiny("mistral", sliding_window=4096).config, 2048)
    assert not attention.fits(tiny("mistral", sliding_window=256).config, 2048)  # the window would be lost
    from transformers import AutoConfig

    assert not attention.fits(AutoConfig.for_model("gemma2"), 512)  # soft-capped attention, sliding layers
    assert not attention.fits(AutoConfig.for_model("gpt2"), 512)  # not known to be plain causal attention


def test_docstring_examples():
    assert doctest.testmod(sftdist.engine.attention).failed == 0


def reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, is_causal=None, window_size=None,
                     enable_gqa=False):
    """What torch's varlen kernel computes, document by document, for the CPU test of the glue around it:
    [N, H, D] tokens cut at cu_seq, causal (by either spelling), GQA only when asked."""
    assert is_causal or window_size == (-1, 0)
    assert cu_q.dtype == torch.int32 and max_q == int((cu_q[1:] - cu_q[:-1]).max())
    assert enable_gqa or k.shape[1] == q.shape[1]
    bounds = cu_q.tolist()
    return torch.cat([F.scaled_dot_product_attention(
        q[s:e].transpose(0, 1), k[s:e].transpose(0, 1), v[s:e].transpose(0, 1), is_causal=True, scale=scale,
        enable_gqa=enable_gqa).transpose(0, 1) for s, e in zip(bounds, bounds[1:])])


@pytest.mark.parametrize("params", [{"window_size", "enable_gqa"}, {"is_causal"}], ids=["torch2.12+", "torch2.10"])
def test_the_varlen_call_equals_attention_by_document(params):
    """The flattening, cu_seqlens, GQA and causal spelling around the GPU's varlen kernel (which needs CUDA; here
    a reference of its contract), against the per-document sdpa path on the same packed rows."""
    g = torch.Generator().manual_seed(0)
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 0, 1], [0, 1, 2, 0, 1, 2, 3, 4]])
    q, k, v = (torch.randn(2, h, 8, 16, generator=g) for h in (4, 2, 2))
    docs = attention.Documents.from_positions(positions)
    want, _ = attention.sdpa_by_document(None, q, k, v, None, scaling=0.25, documents=docs)
    got = attention.varlen_attention(q, k, v, docs, 0.25, kernel=(reference_varlen, frozenset(params)))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_device_batch_finds_documents_and_supervised_positions_on_the_host():
    """What the forward would read back from the device comes from the host, and the losses are the same."""
    from sftdist.engine.forward import DOCUMENTS, SUPERVISED_INDEX, device_batch

    attention.register()
    model = tiny()
    model.set_attn_implementation(attention.NAME)
    rows = samples()
    batch = collate_packed([rows[:2], rows[2:5], rows[5:]], 0)
    on_device = device_batch(batch, torch.device("cpu"))
    flat = batch["targets"].reshape(-1)
    assert on_device[SUPERVISED_INDEX].tolist() == [i for i, t in enumerate(flat.tolist()) if t != IGNORE_INDEX]
    assert on_device[DOCUMENTS].spans == attention.document_spans(batch["position_ids"].tolist())
    with torch.no_grad():
        want, want_index = supervised_losses(model, batch)
        got, index = supervised_losses(model, on_device)
    assert torch.equal(index, want_index)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
