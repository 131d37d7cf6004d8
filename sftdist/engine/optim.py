"""Optimizer parameter groups and the learning-rate schedule as a pure function of the step."""

from __future__ import annotations

import math

import torch

from sftdist.config import TrainConfig


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Split trainable parameters into decayed (matrices) and not decayed (biases, norms, embeddings).

    Returns:
        Two AdamW groups; frozen parameters (e.g. the base model under LoRA) are left out.
    """
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        # ZeRO-3 partitions parameters, so use the original number of dimensions where it is recorded.
        ndim = len(p.ds_shape) if hasattr(p, "ds_shape") else p.ndim
        (decay if ndim >= 2 and id(p) not in embeddings else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_steps(train: TrainConfig, max_steps: int) -> int:
    """``train.warmup_steps`` if set, else ``warmup_ratio`` of the run."""
    return train.warmup_steps or int(train.warmup_ratio * max_steps)


def lr_multiplier(step: int, *, max_steps: int, warmup: int, schedule: str, min_lr_ratio: float) -> float:
    """Learning rate of optimizer step ``step`` (0-based) as a fraction of the peak.

    Linear warmup over ``warmup`` steps, reaching the peak at step ``warmup``, then ``cosine``,
    ``linear`` or ``constant`` decay to ``min_lr_ratio`` at the last step.

    Example:
        >>> [round(lr_multiplier(s, max_steps=5, warmup=2, schedule="linear", min_lr_ratio=0.0), 2)
        ...  for s in range(5)]
        [0.33, 0.67, 1.0, 0.5, 0.0]
    """
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    decay_steps = max(max_steps - warmup - 1, 1)
    progress = min((step - warmup) / decay_steps, 1.0)
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress
    return min_lr_ratio + (1 - min_lr_ratio) * shape
