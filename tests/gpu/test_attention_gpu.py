"""What only a GPU can show of attention by document (sftdist/engine/attention.py): the varlen flash-attention
call gives the per-document sdpa path's output and gradients in bf16, and a training forward through
``forward.device_batch`` makes no host sync (backward may: torch's embedding backward counts its unique ids on the
host; the device run's SFTDIST_SYNC_CHECK reports where). Skipped without CUDA."""

import warnings

import pytest
import torch

from sftdist.data.collate import collate_packed
from sftdist.engine import attention
from sftdist.engine.forward import device_batch, supervised_losses
from tests.unit.test_attention import samples, tiny

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.skipif(attention.varlen_kernel() is None, reason="this torch has no torch.nn.attention.varlen")
def test_varlen_equals_per_document_sdpa_in_bf16():
    g = torch.Generator(device="cuda").manual_seed(0)
    positions = torch.cat([torch.arange(300), torch.arange(500), torch.arange(224)]).repeat(2, 1)
    docs = attention.Documents.from_positions(positions).on(torch.device("cuda"))
    q, k, v = (torch.randn(2, h, 1024, 64, generator=g, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for h in (14, 2, 2))
    assert attention.use_varlen(q, 0.0)
    got = attention.varlen_attention(q, k, v, docs, 0.125)
    grads = torch.autograd.grad(got.float().square().sum(), (q, k, v))
    groups = q.shape[1] // k.shape[1]
    want = torch.cat([torch.cat([torch.nn.functional.scaled_dot_product_attention(
        q[b:b + 1, :, s:e], k[b:b + 1, :, s:e].repeat_interleave(groups, 1),
        v[b:b + 1, :, s:e].repeat_interleave(groups, 1), is_causal=True, scale=0.125) for s, e in row], dim=2)
        for b, row in enumerate(docs.spans)]).transpose(1, 2)
    want_grads = torch.autograd.grad(want.float().square().sum(), (q, k, v))
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    for a, b in zip(grads, want_grads):
        torch.testing.assert_close(a, b, rtol=5e-2, atol=5e-2)


def test_a_training_forward_makes_no_host_sync():
    attention.register()
    model = tiny("qwen2").to("cuda", torch.bfloat16)
    model.set_attn_implementation(attention.NAME)
    rows = samples()
    batch = collate_packed([rows[:3], rows[3:]], 0)
    supervised_losses(model, device_batch(batch, torch.device("cuda")))[0].sum().backward()  # warm-up
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            losses, _ = supervised_losses(model, device_batch(batch, torch.device("cuda")))
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [f"{w.filename}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)]
    assert not syncs, syncs
