"""sdpa attention that runs each packed document (and each padding tail) as its own causal sequence.

With ``attn_implementation=sdpa`` transformers gives a packed row a dense ``[T, T]`` block-diagonal mask, and
sdpa computes every block of it, also the cross-document ones it then throws away; with a mask it cannot use
its causal fast path either. Under ``sdpa_by_document`` the same row is cut at its position-id restarts and
each piece goes through ``scaled_dot_product_attention(is_causal=True)`` without a mask: the same result
(each token attends to the earlier tokens of its own document), for the work of ``sum(T_i^2) / 2``
instead of ``T^2``. ``train.build_engine`` switches plain-causal models (``CAUSAL_MODEL_TYPES``, no sliding
window shorter than the sequence, no attention soft-capping) from ``sdpa`` to it; any call it does not cover
(no document spans, a KV cache) falls through to transformers' own sdpa.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NAME = "sftdist_sdpa_by_document"
# Attention in these is plain causal softmax attention (with GQA), so cutting at documents changes nothing.
CAUSAL_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "olmo2", "granite")


def document_spans(position_ids: list[list[int]]) -> list[list[tuple[int, int]]]:
    """``[start, end)`` of each document in each row: a document starts wherever the position id does not
    go up by one (collate restarts it at 0 for every sample and for the padding tail).

    Example:
        >>> document_spans([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 1]])
        [[(0, 3), (3, 5), (5, 6)], [(0, 4), (4, 6)]]
    """
    out = []
    for row in position_ids:
        starts = [0] + [t for t in range(1, len(row)) if row[t] != row[t - 1] + 1]
        out.append(list(zip(starts, starts[1:] + [len(row)])))
    return out


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def sdpa_by_document(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                     is_causal=None, document_spans=None, ulysses=None, **kwargs):
    """transformers' attention-function signature: ``query`` [B, H, T, D], ``key``/``value`` [B, KV, T, D]
    -> ``([B, T, H, D], None)``.

    With ``ulysses`` (a sequence-parallel forward, ``sequence_parallel.forward_kwargs``) T is this rank's
    slice and ``document_spans`` are the whole rows': DeepSpeed's Ulysses attention gathers the sequence for
    a share of the heads and calls back here without ``ulysses``."""
    if ulysses is not None:
        return ulysses(module, query, key, value, None, dropout=dropout, scaling=scaling,
                       document_spans=document_spans, **kwargs)
    if document_spans is None or query.shape[2] != key.shape[2]:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    groups = query.shape[1] // key.shape[1]
    key, value = _repeat_kv(key, groups), _repeat_kv(value, groups)
    rows = []
    for b, spans in enumerate(document_spans):
        rows.append(torch.cat([F.scaled_dot_product_attention(
            query[b:b + 1, :, s:e], key[b:b + 1, :, s:e], value[b:b + 1, :, s:e], dropout_p=dropout,
            is_causal=True, scale=scaling) for s, e in spans], dim=2))
    return torch.cat(rows, dim=0).transpose(1, 2).contiguous(), None


def register() -> None:
    """Make ``NAME`` a transformers attention implementation (its masks are sdpa's, for the calls that fall
    through)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, sdpa_by_document)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)


def use_for(model, attn_implementation: str, max_length: int):
    """Switch a model configured with ``sdpa`` to ``NAME`` where that gives the same result (``fits``):
    packed documents then attend within themselves without a dense mask. Returns the model."""
    if attn_implementation == "sdpa" and fits(model.config, max_length):
        register()
        model.set_attn_implementation(NAME)
    return model


def fits(config, max_length: int) -> bool:
    """Can this model's sdpa attention be run document by document without changing its result?"""
    window = getattr(config, "sliding_window", None)
    if getattr(config, "use_sliding_window", True) is False:
        window = None
    return (config.model_type in CAUSAL_MODEL_TYPES and (window is None or window >= max_length)
            and not getattr(config, "attn_logit_softcapping", None))
