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


class _TokenCrossEntropy(torch.autograd.Function):
    """Cross-entropy of rows of logits, with a backward that reuses the logits' own storage.

    ``F.cross_entropy`` keeps a ``[N, V]`` log-softmax for backward and builds its gradient from a zero-filled
    ``[N, V]`` one-hot scatter: three full passes over memory beyond the logits. Here forward keeps only the
    logits and the per-row log-sum-exp, and backward turns the logits into ``softmax - onehot`` in place.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        lse = torch.logsumexp(logits, dim=-1)
        ctx.save_for_backward(logits, lse, targets)
        return lse - logits.gather(1, targets[:, None]).squeeze(1)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        logits, lse, targets = ctx.saved_tensors
        # The logits were made for this loss alone (see token_cross_entropy), so their storage is free now.
        grad = logits.sub_(lse[:, None]).exp_()
        grad[torch.arange(len(targets), device=grad.device), targets] -= 1
        return grad.mul_(grad_out[:, None]), None


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-row cross-entropy ``logsumexp(logits) - logits[target]``, equal to
    ``F.cross_entropy(logits, targets, reduction="none")`` in value and gradient.

    ``logits`` must be fp32 and used by nothing else: backward overwrites them with their gradient.

    Example:
        >>> x = torch.tensor([[0.0, 0.0], [2.0, 0.0]], requires_grad=True)
        >>> [round(v, 4) for v in token_cross_entropy(x * 1, torch.tensor([0, 1])).tolist()]
        [0.6931, 2.1269]
    """
    return _TokenCrossEntropy.apply(logits, targets)


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
