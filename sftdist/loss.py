"""Token-level cross-entropy, per-source sums for logging, and the scale that turns summed token losses
into a loss per supervised token of the whole optimizer step (all micro-batches, all data-parallel ranks)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sftdist.data.tokenize import IGNORE_INDEX


def supervised_token_losses(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy (fp32) of every supervised position.

    Only supervised rows of the logits go through the softmax, which saves memory and time when most
    tokens are prompt.

    Example::

        targets = [[7, -100, 2]]  ->  losses = [CE(logits[0,0], 7), CE(logits[0,2], 2)],  mask = [[T, F, T]]

    Args:
        logits: [B, T, V] scores for the next token at each position.
        targets: [B, T] next-token ids (already shifted), ``-100`` where not supervised.

    Returns:
        ``(losses, mask)``: losses [N] with grad, N = supervised positions; mask [B, T] bool.
    """
    mask = targets != IGNORE_INDEX
    return F.cross_entropy(logits[mask].float(), targets[mask], reduction="none"), mask


def token_loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy over supervised positions and their count.

    Example::

        targets = [[7, -100, 2]]  ->  loss_sum = CE(logits[0,0], 7) + CE(logits[0,2], 2),  count = 2
    """
    losses, mask = supervised_token_losses(logits, targets)
    return losses.sum(), mask.sum()


def per_source_sums(losses: torch.Tensor, sources: torch.Tensor, num_sources: int) -> torch.Tensor:
    """Summed loss and token count per data source, as one vector ``[sum_0..sum_S-1, count_0..count_S-1]``.

    Example:
        >>> per_source_sums(torch.tensor([0.5, 1.0, 2.0]), torch.tensor([0, 1, 1]), 2).tolist()
        [0.5, 3.0, 1.0, 2.0]

    Args:
        losses: [N] token losses (detached inside).
        sources: [N] source id of each token.
        num_sources: Number of sources S.
    """
    out = torch.zeros(2 * num_sources, dtype=torch.float64, device=losses.device)
    out.index_add_(0, sources, losses.detach().double())
    out.index_add_(0, sources + num_sources, torch.ones_like(losses, dtype=torch.float64))
    return out


def backward_scale(global_tokens: int, grad_accum: int, dp_world: int) -> float:
    """Factor for each micro-batch's summed token loss before ``engine.backward``.

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
