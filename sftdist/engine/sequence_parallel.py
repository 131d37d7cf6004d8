"""Ulysses sequence parallelism (``parallelism.sequence_parallel_size``): one sequence split across the ranks
of an SP group.

Ranks form groups of ``size`` consecutive ranks; data parallelism runs across the groups (DP = world / SP).
Every rank of a group gets the same micro-batches (``dp_rank``, ``dp_world``) and keeps 1/SP of each row's
positions (``shard``): embeddings, MLPs, norms, the LM head and the loss run on that slice only. In each
attention layer DeepSpeed's ``UlyssesSPAttentionHF`` swaps the split: an all-to-all gives every rank the
whole sequence for 1/SP of the heads, attention runs there, and a second all-to-all splits the sequence
again. The core attention is ``attention.sdpa_by_document`` with the document spans of the *whole* row,
computed on the host before the row was sharded, so packed documents never attend across their boundaries
wherever the cut falls.

The loss needs nothing special: targets are shifted before sharding, so each rank's slice holds its own
positions' next-token targets, and the loop divides the summed token losses of every rank (DP and SP) by
the step's global supervised count. DeepSpeed sums gradients over all ranks and divides by DP only
(``zero/stage_1_and_2.py``: ``world / sequence_parallel_size``), hence ``loss.backward_scale(dp_world=...)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from sftdist.data.tokenize import IGNORE_INDEX
from sftdist.engine import attention

FULL_POSITIONS = "sp_position_ids"  # a sharded batch's whole-row position ids: the document spans come from it
# What padding holds in each collated tensor (``data.collate``); anything else pads with 0.
PAD_FILL = {"targets": IGNORE_INDEX, "token_source": -1, "sample_index": -1, "attention_mask": 0}


@dataclass
class _Groups:
    size: int = 1
    rank: int = 0  # within the SP group
    dp_rank: int = 0
    dp_world: int = 1
    group: Optional[object] = None  # the SP process group
    mpu: Optional[object] = None  # DeepSpeed's parallel_state_sp, for deepspeed.initialize(mpu=...)


_groups = _Groups()
_attention_by_batch: dict[int, object] = {}  # UlyssesSPAttentionHF per micro-batch size (its shapes are fixed)


def setup(size: int, *, rank: int, world: int) -> None:
    """Make the SP and DP groups (every rank calls it, after the process group exists). ``size`` 1 is plain
    data parallelism over all ``world`` ranks."""
    global _groups
    _attention_by_batch.clear()
    if size == 1:
        _groups = _Groups(1, 0, rank, world)
        return
    from deepspeed.runtime.sequence_parallel import parallel_state_sp as mpu

    if getattr(mpu, "_SEQUENCE_PARALLEL_GROUP", None) is None:  # (a local sweep's later points reuse them)
        mpu.initialize_sequence_parallel(size)
    _groups = _Groups(size, rank % size, rank // size, world // size, mpu.get_sequence_parallel_group(), mpu)


def size() -> int:
    return _groups.size


def sp_rank() -> int:
    return _groups.rank


def dp_rank() -> int:
    """This rank's data-parallel index: which share of each global batch its SP group trains."""
    return _groups.dp_rank


def dp_world() -> int:
    """Data-parallel groups (world / sequence_parallel_size)."""
    return _groups.dp_world


def mpu():
    """DeepSpeed's view of the groups (``deepspeed.initialize(mpu=...)``), or None without SP."""
    return _groups.mpu


def model_problem(config, sp: int, attn_implementation: str, max_length: int) -> Optional[str]:
    """Why this model cannot train with ``sp`` sequence-parallel ranks, or None.

    Example:
        >>> from types import SimpleNamespace as C
        >>> model_problem(C(model_type="llama", num_attention_heads=6, num_key_value_heads=2), 4, "sdpa", 512)
        'its 6 attention heads do not divide into 4 sequence-parallel ranks (each rank attends with 1/4 of the heads)'
    """
    if sp == 1:
        return None
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    if heads % sp:
        return (f"its {heads} attention heads do not divide into {sp} sequence-parallel ranks (each rank "
                f"attends with 1/{sp} of the heads)")
    if kv % sp and sp % kv:
        return (f"its {kv} key/value heads neither divide into {sp} sequence-parallel ranks nor divide {sp} "
                f"(to be replicated)")
    if attn_implementation != "sdpa":
        return (f"model.attn_implementation={attn_implementation}: sequence parallelism runs sdpa attention "
                f"document by document (set model.attn_implementation=sdpa)")
    if not attention.fits(config, max_length):
        return (f"its attention ({config.model_type}) is not plain causal attention over train.max_length="
                f"{max_length} (a sliding window, soft-capping, or a model type outside "
                f"{', '.join(attention.CAUSAL_MODEL_TYPES)}), which sequence parallelism needs")
    return None


def pad_to_multiple(batch: dict[str, torch.Tensor], multiple: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad every ``[B, T]`` tensor of a collated batch so that T divides by ``multiple``.

    The padding is what ``collate`` pads with: ``pad_id`` input, ignored targets, no source; its position ids
    continue a row's padding tail, or start a tail of their own at 0, so it is a document of its own.

    Example:
        >>> b = {"input_ids": torch.tensor([[5, 6, 7]]), "position_ids": torch.tensor([[0, 1, 0]]),
        ...      "targets": torch.tensor([[6, -100, -100]]), "token_source": torch.tensor([[0, 0, -1]])}
        >>> {k: v.tolist()[0] for k, v in pad_to_multiple(b, 2, pad_id=9).items()}
        {'input_ids': [5, 6, 7, 9], 'position_ids': [0, 1, 0, 1], 'targets': [6, -100, -100, -100], 'token_source': [0, 0, -1, -1]}
    """
    width = batch["input_ids"].shape[1]
    extra = -width % multiple
    if not extra:
        return batch
    out = {}
    for key, value in batch.items():
        if key == "position_ids":
            # A row that ends in padding (source -1) goes on counting; any other row starts a new tail at 0.
            tail = batch["token_source"][:, -1:] < 0 if "token_source" in batch else torch.zeros_like(value[:, -1:])
            start = torch.where(tail.bool(), value[:, -1:] + 1, torch.zeros_like(value[:, -1:]))
            fill = start + torch.arange(extra, device=value.device)
        else:
            fill = torch.full((value.shape[0], extra), pad_id if key == "input_ids" else PAD_FILL.get(key, 0),
                              dtype=value.dtype, device=value.device)
        out[key] = torch.cat([value, fill], dim=1)
    return out


def shard(batch: dict[str, torch.Tensor], rank: int, sp: int, pad_id: int) -> dict[str, torch.Tensor]:
    """This SP rank's slice of a collated batch: positions ``[rank * T/sp, (rank + 1) * T/sp)`` of every row
    (T padded to a multiple of ``sp`` first), and the whole rows' position ids under ``FULL_POSITIONS``.
    The attention mask goes: document spans keep padding apart.

    Example:
        >>> b = {"input_ids": torch.tensor([[5, 6, 7, 8]]), "position_ids": torch.tensor([[0, 1, 2, 0]]),
        ...      "targets": torch.tensor([[6, 7, -100, -100]]), "token_source": torch.tensor([[0, 0, 0, 1]])}
        >>> {k: v.tolist()[0] for k, v in shard(b, 1, 2, pad_id=0).items()}
        {'input_ids': [7, 8], 'position_ids': [2, 0], 'targets': [-100, -100], 'token_source': [0, 1], 'sp_position_ids': [0, 1, 2, 0]}
    """
    batch = pad_to_multiple({k: v for k, v in batch.items() if k != "attention_mask"}, sp, pad_id)
    width = batch["input_ids"].shape[1] // sp
    local = {k: v[:, rank * width:(rank + 1) * width] for k, v in batch.items()}
    local[FULL_POSITIONS] = batch["position_ids"]
    return local


def local_batch(batch: dict[str, torch.Tensor], pad_id: int) -> dict[str, torch.Tensor]:
    """``shard`` for this rank under the run's groups; the batch itself without SP."""
    return batch if _groups.size == 1 else shard(batch, _groups.rank, _groups.size, pad_id)


def forward_kwargs(batch: dict[str, torch.Tensor], config, documents) -> dict:
    """What the model's forward needs for ``attention.NAME``: the (whole rows') ``documents``
    (``attention.Documents``), and for a sharded batch the Ulysses attention (``attention.sdpa_by_document``
    hands over to it)."""
    if FULL_POSITIONS not in batch:
        return {"documents": documents}
    return {"documents": documents, "ulysses": ulysses_attention(batch["input_ids"].shape[0], config)}


def ulysses_attention(batch_size: int, config):
    """DeepSpeed's Ulysses attention around ``sdpa_by_document`` for micro-batches of ``batch_size`` rows of
    a model with this (text) ``config``."""
    if batch_size not in _attention_by_batch:
        from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

        heads = config.num_attention_heads
        _attention_by_batch[batch_size] = UlyssesSPAttentionHF(
            attn=attention.sdpa_by_document, batch_size=batch_size, attn_head_count=heads,
            attn_head_size=getattr(config, "head_dim", None) or config.hidden_size // heads,
            kv_head_count=getattr(config, "num_key_value_heads", None) or heads,
            num_hidden_layers=config.num_hidden_layers, process_group=_groups.group, seq_length_is_variable=True)
    return _attention_by_batch[batch_size]
