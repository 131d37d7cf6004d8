"""Turn tokenized examples into one micro-batch format, packed or padded, with per-example next-token targets.

Both ``collate`` (one example per row) and ``collate_packed`` (several examples per row) return long
tensors ``input_ids``, ``position_ids``, ``targets``, ``token_source`` and ``sample_index`` of shape [B, T];
``collate`` adds ``attention_mask``. Position ids restart at 0 at every example and at the padding tail,
which is what keeps packed examples apart: called with ``attention_mask=None`` and these ``position_ids``,
transformers (``masking_utils.create_causal_mask`` -> ``find_packed_sequence_indices``) starts a new block
wherever the position does not go up by one and builds a block-diagonal causal mask for ``sdpa``, ``eager``
and ``flex_attention``. It does so only when no cache is passed, so the model needs ``config.use_cache=False``
(``build_model`` sets it; with a cache each row silently gets one causal block). ``flash_attention_2``
reads the blocks from ``position_ids`` only when the batch has one row
(``modeling_flash_attention_utils._is_packed_sequence``), so under it pass ``input_ids.view(1, -1)`` and
``position_ids.view(1, -1)``: every row, and its padding tail, starts at position 0, so rows stay apart too.
"""

from __future__ import annotations

import torch

from sftdist.data.tokenize import IGNORE_INDEX

PAD_SOURCE = -1  # token_source on padding positions
PAD_SAMPLE = -1  # sample_index on padding positions


def shift_labels(labels: list[int]) -> list[int]:
    """Targets for next-token prediction: position t is trained to predict ``labels[t + 1]``.

    Shifting per example (not per padded or packed row) keeps a later example's first token from becoming
    the target of an earlier example's last token.

    Example:
        >>> shift_labels([-100, 7, 8, 2])
        [7, 8, 2, -100]
    """
    return list(labels[1:]) + [IGNORE_INDEX]


def collate_packed(rows: list[list[dict]], pad_id: int) -> dict[str, torch.Tensor]:
    """Concatenate each row's examples into one sequence and right-pad the rows to the longest one.

    Example (pad_id = 0)::

        rows = [[{input_ids: [5, 6, 7], labels: [-100, 6, 7], source: 1},
                 {input_ids: [8, 9], labels: [8, 9]}],
                [{input_ids: [3, 4], labels: [-100, 4]}]]
        input_ids    = [[5, 6, 7,    8, 9   ], [3, 4,    0,    0,    0   ]]
        position_ids = [[0, 1, 2,    0, 1   ], [0, 1,    0,    1,    2   ]]
        targets      = [[6, 7, -100, 9, -100], [4, -100, -100, -100, -100]]
        token_source = [[1, 1, 1,    0, 0   ], [0, 0,    -1,   -1,   -1  ]]
        sample_index = [[0, 0, 0,    1, 1   ], [2, 2,    -1,   -1,   -1  ]]

    ``sample_index`` numbers the examples of the whole micro-batch in row-major order, so that a loss can
    weigh each example (not each token) the same, also after the [B, T] tensors are cut along T.

    There is no ``attention_mask``: call the model with ``input_ids`` and ``position_ids`` only, so that
    transformers builds the block-diagonal causal mask from the position restarts (see the module
    docstring; under ``flash_attention_2`` flatten the batch to one row first). The padding tail counts
    0, 1, 2, ... as a block of its own, so no real token attends to it or it to them.

    Args:
        rows: One list of examples per row. An example is a dict with ``input_ids``, ``labels`` (same
            length) and optionally ``source`` (an int id, default 0).
        pad_id: Token id used for padding (never trained on).

    Returns:
        Long tensors of shape [B, T], T the longest row: ``input_ids``; ``position_ids`` (0.. per example);
        ``targets`` (labels shifted left within each example, -100 on each example's last token and on
        padding); ``token_source`` (the example's source on each of its tokens, -1 on padding);
        ``sample_index`` (the example's number in the micro-batch, 0.. in row-major order, -1 on padding).
    """
    width = max((sum(len(e["input_ids"]) for e in row) for row in rows), default=0)
    out: dict[str, list[list[int]]] = {"input_ids": [], "position_ids": [], "targets": [], "token_source": [],
                                       "sample_index": []}
    sample = 0
    for row in rows:
        ids, pos, tgt, src, idx = [], [], [], [], []
        for e in row:
            n = len(e["input_ids"])
            if len(e["labels"]) != n:
                raise ValueError(f"example has {n} input_ids but {len(e['labels'])} labels")
            ids += e["input_ids"]
            pos += range(n)
            tgt += shift_labels(e["labels"])
            src += [e.get("source", 0)] * n
            idx += [sample] * n
            sample += 1
        pad = width - len(ids)
        out["input_ids"].append(ids + [pad_id] * pad)
        out["position_ids"].append(pos + list(range(pad)))
        out["targets"].append(tgt + [IGNORE_INDEX] * pad)
        out["token_source"].append(src + [PAD_SOURCE] * pad)
        out["sample_index"].append(idx + [PAD_SAMPLE] * pad)
    return {k: torch.tensor(v, dtype=torch.long).view(len(rows), width) for k, v in out.items()}


def collate(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of examples to the longest one, one example per row.

    The same format as ``collate_packed`` with one example per row, plus ``attention_mask``.

    Example (pad_id = 0)::

        examples = [{input_ids: [5, 6, 7], labels: [-100, 6, 7], source: 1},
                    {input_ids: [8, 9], labels: [8, 9]}]
        input_ids      = [[5, 6, 7], [8, 9, 0]]
        attention_mask = [[1, 1, 1], [1, 1, 0]]
        position_ids   = [[0, 1, 2], [0, 1, 0]]
        targets        = [[6, 7, -100], [9, -100, -100]]
        token_source   = [[1, 1, 1], [0, 0, -1]]
        sample_index   = [[0, 0, 0], [1, 1, -1]]

    Args:
        examples: Dicts with ``input_ids``, ``labels`` and optionally ``source`` (an int id, default 0).
        pad_id: Token id used for padding (never trained on).

    Returns:
        Long tensors of shape [B, T]: those of ``collate_packed`` and ``attention_mask`` (1 real, 0 padding).
    """
    batch = collate_packed([[e] for e in examples], pad_id)
    lengths = torch.tensor([len(e["input_ids"]) for e in examples], dtype=torch.long)
    batch["attention_mask"] = (torch.arange(batch["input_ids"].shape[1]) < lengths[:, None]).long()
    return batch
