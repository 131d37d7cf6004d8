"""Token-level cross-entropy, per-source sums for logging, and the weights and scale that turn summed token
losses into the step's loss: a mean per supervised token, or per sample (``train.loss_normalization``), over
the whole optimizer step (all micro-batches, all data-parallel ranks).

The weights are per position of a collated micro-batch and depend only on that whole micro-batch, so a rank
that computes losses on a slice of its positions (sequence parallelism) weighs them exactly as the whole
would: every term of the step's sum is ``weight * token loss``, wherever it is computed."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sftdist.data.tokenize import IGNORE_INDEX


def supervised_positions(targets: torch.Tensor) -> torch.Tensor:
    """The flat ``[B * T]`` positions of the supervised targets (found where ``targets`` lives: on the host
    before a batch's copy, the loop's case, nothing waits for the GPU).

    Example:
        >>> supervised_positions(torch.tensor([[-100, 5, 6], [7, -100, -100]])).tolist()
        [1, 2, 3]
    """
    return (targets.reshape(-1) != IGNORE_INDEX).nonzero().flatten()


def at_supervised(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``values`` [B, T, ...] at the flat supervised positions ``index`` -> [N, ...], without the host sync
    of a boolean mask's indexing.

    Example:
        >>> at_supervised(torch.tensor([[10, 11, 12], [13, 14, 15]]), torch.tensor([1, 3])).tolist()
        [11, 13]
    """
    return values.reshape(-1, *values.shape[2:]).index_select(0, index)


def supervised_token_losses(logits: torch.Tensor, targets: torch.Tensor,
                            index: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy (fp32) of every supervised position.

    Only supervised rows of the logits go through the softmax, which saves memory and time when most
    tokens are prompt.

    Example::

        targets = [[7, -100, 2]]  ->  losses = [CE(logits[0,0], 7), CE(logits[0,2], 2)],  index = [0, 2]

    Args:
        logits: [B, T, V] scores for the next token at each position.
        targets: [B, T] next-token ids (already shifted), ``-100`` where not supervised.
        index: ``supervised_positions(targets)`` where already known.

    Returns:
        ``(losses, index)``: losses [N] with grad, N = supervised positions; their flat positions [N].
    """
    index = supervised_positions(targets) if index is None else index
    return F.cross_entropy(at_supervised(logits, index).float(), at_supervised(targets, index),
                           reduction="none"), index


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
    losses, index = supervised_token_losses(logits, targets)
    return losses.sum(), torch.tensor(index.numel(), device=losses.device)


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


def dft(losses: torch.Tensor) -> torch.Tensor:
    """Dynamic Fine-Tuning (``train.loss=dft``): each token's cross-entropy times the probability the model
    gives its target, ``CE * exp(-CE)``, the probability detached (a weight, not a path for the gradient).

    Tokens the model already finds likely keep their weight and unlikely ones are damped, which keeps SFT
    from pulling hard on a few improbable tokens (Wu et al. 2025, "On the Generalization of SFT").

    Example:
        >>> ce = torch.log(torch.tensor([2.0, 8.0])).requires_grad_()  # target probabilities 1/2 and 1/8
        >>> y = dft(ce)
        >>> [round(v, 4) for v in y.tolist()]  # ln 2 * 1/2, ln 8 * 1/8
        [0.3466, 0.2599]
        >>> y.sum().backward()
        >>> ce.grad.tolist()  # d/dCE is the detached probability
        [0.5, 0.125]
    """
    return losses * torch.exp(-losses.detach())


def token_weights(batch: dict[str, torch.Tensor], normalization: str) -> torch.Tensor:
    """Each position's weight in the step's summed loss, from the whole collated micro-batch.

    ``token``: 1 everywhere. ``sequence``: ``1 / n`` on the supervised positions of a sample with ``n`` of
    them (0 elsewhere), so that each sample's weights add up to 1 however long its reply, and divided by the
    step's supervised samples (``loss_denominator``) the loss is the mean over samples of each sample's mean.

    Example (a packed row with samples of 1 and 3 supervised positions, then padding)::

        targets      = [[5,   -100, 6,   7,   8,   -100, -100]]
        sample_index = [[0,   0,    1,   1,   1,   1,    -1  ]]
        weights      = [[1.0, 0,    1/3, 1/3, 1/3, 0,    0   ]]

        >>> batch = {"targets": torch.tensor([[5, -100, 6, 7, 8, -100, -100]]),
        ...          "sample_index": torch.tensor([[0, 0, 1, 1, 1, 1, -1]])}
        >>> [round(w, 4) for w in token_weights(batch, "sequence")[0].tolist()]
        [1.0, 0.0, 0.3333, 0.3333, 0.3333, 0.0, 0.0]

    Args:
        batch: ``collate``/``collate_packed`` output (``targets``, ``sample_index``), before any slicing.
        normalization: ``token`` or ``sequence`` (``train.loss_normalization``).

    Returns:
        float32 [B, T] on the batch's device.
    """
    targets = batch["targets"]
    if normalization == "token":
        return torch.ones(targets.shape, dtype=torch.float32, device=targets.device)
    supervised = targets != IGNORE_INDEX
    index = batch["sample_index"][supervised]
    counts = torch.bincount(index).float()  # supervised positions per sample
    weights = torch.zeros(targets.shape, dtype=torch.float32, device=targets.device)
    weights[supervised] = 1.0 / counts[index]
    return weights


def supervised_samples(batch: dict[str, torch.Tensor]) -> int:
    """Samples of a collated micro-batch with at least one supervised position.

    Example:
        >>> supervised_samples({"targets": torch.tensor([[5, -100, -100, 7], [-100, -100, -100, -100]]),
        ...                     "sample_index": torch.tensor([[0, 0, 1, 2], [3, 3, -1, -1]])})
        2
    """
    return int(batch["sample_index"][batch["targets"] != IGNORE_INDEX].unique().numel())


def loss_denominator(normalization: str, *, supervised_tokens: int, supervised_samples: int) -> int:
    """What the step's weighted loss sum is divided by: its supervised tokens (``token``) or its samples
    with a supervised token (``sequence``), both summed over micro-batches and ranks.

    Example:
        >>> loss_denominator("sequence", supervised_tokens=100, supervised_samples=6)
        6
    """
    return int(supervised_samples if normalization == "sequence" else supervised_tokens)


def backward_scale(denominator: int, grad_accum: int, dp_world: int) -> float:
    """Factor for each micro-batch's weighted token-loss sum before ``engine.backward``.

    DeepSpeed divides every micro-batch loss by ``grad_accum`` and averages gradients over the
    ``dp_world`` ranks. Multiplying by ``grad_accum * dp_world / denominator`` undoes both, so the applied
    gradient is that of ``sum(weight * token loss) / denominator`` over the whole step. With ``token``
    normalisation (weights 1, denominator the global supervised tokens) every supervised token weighs the
    same whichever micro-batch or rank it sits in (not a mean of per-micro-batch means); with ``sequence``
    (weights ``1/n`` per sample, denominator the global supervised samples) every sample does.

    Example:
        >>> backward_scale(100, grad_accum=4, dp_world=2)  # 100 supervised tokens in the step
        0.08
        >>> backward_scale(loss_denominator("sequence", supervised_tokens=100, supervised_samples=16), 4, 2)
        0.5

    Args:
        denominator: The step's ``loss_denominator``: supervised tokens or samples, over micro-batches and
            ranks.
        grad_accum: Micro-batches per rank per optimizer step.
        dp_world: Data-parallel ranks.
    """
    return grad_accum * dp_world / max(denominator, 1)
