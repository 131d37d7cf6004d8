"""The loss-scaling arithmetic, checked against plain autograd, and the learning-rate schedule."""

import pytest
import torch

from sftdist.engine.loss import backward_scale, token_loss_sum
from sftdist.engine.optim import lr_multiplier, param_groups


def test_token_loss_sum_matches_mean_times_count():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    targets = torch.tensor([[1, -100, 3, 4, -100], [-100, -100, 7, 8, 9]])
    loss_sum, count = token_loss_sum(logits, targets)
    mean = torch.nn.functional.cross_entropy(logits.view(-1, 11), targets.view(-1), ignore_index=-100)
    assert count.item() == 6
    assert torch.allclose(loss_sum, mean * 6)


def _grads(weight, micro_batches, grad_accum, world):
    """Emulate DeepSpeed: each micro loss is divided by grad_accum, gradients are averaged over ranks."""
    global_tokens = sum(int((t != -100).sum()) for rank in micro_batches for _, t in rank)
    total = torch.zeros_like(weight)
    for rank in micro_batches:
        for x, t in rank:
            w = weight.clone().requires_grad_(True)
            loss_sum, _ = token_loss_sum(x @ w, t)
            (loss_sum * backward_scale(global_tokens, grad_accum, world) / grad_accum).backward()
            total += w.grad / world
    return total


def test_scaled_gradients_equal_global_token_mean_for_any_layout():
    torch.manual_seed(0)
    weight = torch.randn(4, 6)
    xs = [torch.randn(1, 5, 4) for _ in range(4)]
    # Very different supervised-token counts per sample: a mean of means would weigh them wrongly.
    ts = [torch.tensor([[1, -100, -100, -100, -100]]), torch.tensor([[2, 3, 4, 5, 0]]),
          torch.tensor([[-100, -100, 1, 1, -100]]), torch.tensor([[5, -100, 2, -100, 3]])]
    w = weight.clone().requires_grad_(True)
    big = torch.cat(xs) @ w
    ref_sum, ref_count = token_loss_sum(big, torch.cat(ts))
    (ref_sum / ref_count).backward()
    pairs = list(zip(xs, ts))
    layouts = {"1x4": ([pairs], 4), "2x2": ([pairs[:2], pairs[2:]], 2), "4x1": ([[p] for p in pairs], 1)}
    for name, (ranks, ga) in layouts.items():
        assert torch.allclose(_grads(weight, ranks, ga, len(ranks)), w.grad, atol=1e-6), name


def test_backward_scale_guards_empty_steps():
    assert backward_scale(0, 2, 2) == 4.0


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_lr_schedule_shape(schedule):
    lrs = [lr_multiplier(s, max_steps=20, warmup=4, schedule=schedule, min_lr_ratio=0.1) for s in range(20)]
    assert lrs[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert lrs[-1] == pytest.approx(1.0 if schedule == "constant" else 0.1)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))


def test_param_groups_skip_decay_for_norms_biases_embeddings_and_frozen():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 4), torch.nn.LayerNorm(4),
                                torch.nn.Linear(4, 2, bias=False))
    model[3].weight.requires_grad_(False)
    decay, no_decay = param_groups(model, 0.1)
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 4])]
    assert {tuple(p.shape) for p in no_decay["params"]} == {(10, 4), (4,)} and len(no_decay["params"]) == 4
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
