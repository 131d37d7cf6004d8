"""Pad tokenized examples into a micro-batch with next-token targets."""

from __future__ import annotations

import torch

from sftdist.data.tokenize import IGNORE_INDEX


def shift_labels(labels: list[int]) -> list[int]:
    """Targets for next-token prediction: position t is trained to predict ``labels[t + 1]``.

    Shifting per example (not per padded row) keeps a later example's first token from becoming the
    target of an earlier example's last token.

    Example:
        >>> shift_labels([-100, 7, 8, 2])
        [7, 8, 2, -100]
    """
    return list(labels[1:]) + [IGNORE_INDEX]


def collate(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of examples to the longest one.

    Example (pad_id = 0)::

        examples = [{input_ids: [5, 6, 7], labels: [-100, 6, 7]}, {input_ids: [8, 9], labels: [8, 9]}]
        input_ids      = [[5, 6, 7], [8, 9, 0]]
        attention_mask = [[1, 1, 1], [1, 1, 0]]
        targets        = [[6, 7, -100], [9, -100, -100]]
        source         = [s0, s1]

    Args:
        examples: Dicts with ``input_ids``, ``labels`` and optionally ``source`` (an int id).
        pad_id: Token id used for padding (never trained on).

    Returns:
        Long tensors ``input_ids``, ``attention_mask``, ``targets`` of shape [B, T] and ``source`` [B].
    """
    width = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    targets = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        input_ids[row, :n] = torch.tensor(e["input_ids"])
        targets[row, :n] = torch.tensor(shift_labels(e["labels"]))
        attention_mask[row, :n] = 1
    source = torch.tensor([e.get("source", 0) for e in examples], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "targets": targets, "source": source}
