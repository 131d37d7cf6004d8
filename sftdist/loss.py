"""Token-summed cross-entropy and the scale that turns it into a loss per supervised token of the whole
optimizer step (all micro-batches, all data-parallel ranks)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sftdist.data.tokenize import IGNORE_INDEX


def token_loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy over supervised positions, in fp32.

    Example::

        targets = [[7, -100, 2]]  ->  loss_sum = CE(logits[0,0], 7) + CE(logits[0,2], 2),  count = 2

    Args:
        logits: [B, T, V] scores for the next token at each position.
        targets: [B, T] next-token ids (already shifted), ``-100`` where not supervised.

    Returns:
        ``(loss_sum, count)``: a scalar tensor with grad, and the number of supervised positions.
    """
    loss_sum = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                               reduction="sum")
    return loss_sum, (targets != IGNORE_INDEX).sum()


def backward_scale(global_tokens: int, grad_accum: int, dp_world: int) -> float:
    """Factor for each micro-batch's ``loss_sum`` before ``engine.backward``.

    DeepSpeed divides every micro-batch loss by ``grad_accum`` and averages gradients over the
    ``dp_world`` ranks. Multiplying by ``grad_accum * dp_world / global_tokens`` undoes both, so the
    applied gradient is that of ``sum(token losses) / global_tokens`` over the whole step: every supervised
    token weighs the same whichever micro-batch or rank it sits in (not a mean of per-micro-batch means).

    Example:
        >>> backward_scale(global_tokens=100, grad_accum=4, dp_world=2)
        0.08

    Args:
        global_tokens: Supervised tokens in the optimizer step, summed over micro-batches and ranks.
        grad_accum: Micro-batches per rank per optimizer step.
        dp_world: Data-parallel ranks.
    """
    return grad_accum * dp_world / max(global_tokens, 1)
