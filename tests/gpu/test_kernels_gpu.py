"""What only a GPU can show of ``train.kernels=liger`` (sftdist/engine/kernels.py): Liger's fused head gives
the plain head's per-token losses and gradients (also soft-capped, scaled, empty, and under ZeRO-3), and the
patched RMSNorm, SwiGLU and RoPE keep the model's loss. Skipped without CUDA or liger-kernel."""

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from sftdist.engine import kernels
from tests.unit.test_kernels import zero3_head

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is None,
                                                  reason="needs liger-kernel")]
VOCAB, HIDDEN = 1000, 64


def tiny_qwen2():
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).cuda()


def assert_near(got: torch.Tensor, want: torch.Tensor, rtol: float, what: str) -> None:
    """Within ``rtol`` of ``want``'s largest magnitude: bf16 GEMMs of other shapes round differently."""
    assert got.shape == want.shape, what
    if not want.numel():
        return
    diff = (got.float() - want.float()).abs().max().item()
    assert diff <= rtol * max(want.float().abs().max().item(), 1e-6), f"{what}: off by {diff:.3g}"


def losses_and_grads(per_token, head, hidden, targets, weights):
    hidden.grad, head.weight.grad = None, None
    losses = per_token(hidden)
    (losses * weights).sum().backward()
    return losses.detach(), hidden.grad.clone(), head.weight.grad.clone()


@pytest.mark.parametrize("rows", [300, 0])
@pytest.mark.parametrize("scale, softcap", [(1.0, None), (0.25, None), (1.0, 0.5)])
def test_fused_losses_are_the_plain_heads(rows, scale, softcap):
    kernels._liger_missing.cache_clear()
    model = tiny_qwen2()
    head = model.lm_head
    assert kernels.fused_head_available(model, "liger")
    hidden = torch.randn(rows, HIDDEN, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, VOCAB, (rows,), device="cuda")
    weights = torch.rand(rows, device="cuda")  # unequal, as sequence normalisation and DFT make them

    def plain(h):
        logits = head(h).float() * scale
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return F.cross_entropy(logits, targets, reduction="none")

    want = losses_and_grads(plain, head, hidden, targets, weights)
    got = losses_and_grads(lambda h: kernels.fused_losses(head, h, targets, scale=scale, softcap=softcap),
                           head, hidden, targets, weights)
    assert got[0].dtype == torch.float32 and got[0].shape == (rows,)
    for what, g, w in zip(("losses", "hidden grad", "head weight grad"), got, want):
        assert_near(g, w, 1e-2, what)


@pytest.fixture
def restore_qwen2_module():
    """Liger swaps names in transformers' Qwen2 module for the whole process; other tests want them back."""
    from transformers.models.qwen2 import modeling_qwen2

    saved = dict(vars(modeling_qwen2))
    yield
    vars(modeling_qwen2).update(saved)


def test_patched_layers_keep_the_loss(restore_qwen2_module):
    kernels._liger_missing.cache_clear()
    model = tiny_qwen2()
    ids = torch.randint(0, VOCAB, (2, 64), device="cuda")

    def loss_and_grads():
        model.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    want, want_grads = loss_and_grads()
    line = kernels.apply(model, "liger")
    assert "patched qwen2's rope, rms_norm, swiglu" in line and "fuses its cross-entropy" in line, line
    assert model.model.norm._get_name() == "LigerRMSNorm"
    assert model.model.layers[0].mlp._get_name() == "LigerSwiGLUMLP"
    got, got_grads = loss_and_grads()
    assert_near(got, want, 1e-2, "loss")
    for name, grad in want_grads.items():
        assert_near(got_grads[name], grad, 5e-2, name)


def test_fused_losses_under_zero3(tmp_path):
    """A one-rank ZeRO-3 engine on the GPU: the real kernel through the partitioned head's module call."""
    got = zero3_head(tmp_path, "liger")
    assert got["partitioned"] and got["released"], got
    assert got["losses"] < 1e-3 and got["head_grad"] < 1e-3 and got["body_grad"] < 1e-3, got
