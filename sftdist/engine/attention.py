"""Attention that runs each packed document (and each padding tail) as its own causal sequence.

With ``attn_implementation=sdpa`` transformers gives a packed row a dense ``[T, T]`` block-diagonal mask, and
sdpa computes every block of it, also the cross-document ones it then throws away; with a mask it cannot use
its causal fast path either. Under ``sdpa_by_document`` the same row is cut into its documents and each
goes through causal attention without a mask: the same result (each token attends to the earlier tokens of
its own document), for the work of ``sum(T_i^2) / 2`` instead of ``T^2``. ``train.build_engine`` switches
plain-causal models (``CAUSAL_MODEL_TYPES``, no sliding window shorter than the sequence, no attention
soft-capping) from ``sdpa`` to it; any call it does not cover (no documents, a KV cache) falls through to
transformers' own sdpa.

The documents come from the host (``Documents``, built from the collator's position ids before the batch
goes to the device), so that a forward never reads a device tensor back. On a GPU with bf16/fp16 all
documents of a micro-batch go through one varlen flash-attention call (``torch.nn.attention.varlen``, when
the installed torch has it); elsewhere (CPU, fp32, an older torch) each document goes through
``scaled_dot_product_attention(is_causal=True)``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, replace
from functools import lru_cache

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


@dataclass(frozen=True)
class Documents:
    """Where each document of a micro-batch's rows starts and ends, known on the host.

    ``spans`` are per row (``document_spans``); ``cu_seqlens`` are the same boundaries in the batch flattened
    to one sequence of ``B * T`` tokens (what varlen kernels take), ``max_length`` the longest document.

    Example:
        >>> docs = Documents.from_positions(torch.tensor([[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]]))
        >>> docs.spans, docs.cu_seqlens.tolist(), docs.max_length
        ([[(0, 3), (3, 5)], [(0, 2), (2, 5)]], [0, 3, 5, 7, 10], 3)
    """

    spans: list[list[tuple[int, int]]]
    cu_seqlens: torch.Tensor  # int32 [documents + 1], on the host until ``on`` moves it
    max_length: int

    @classmethod
    def from_positions(cls, position_ids: torch.Tensor) -> "Documents":
        """From ``[B, T]`` position ids on the host (the collator's: 0 at each document's first token), as
        ``document_spans`` cuts them. The boundaries are found by tensor ops, so the Python that remains runs
        once per document, not once per token (this is on every micro-batch's path)."""
        rows, width = position_ids.shape
        starts = torch.ones(rows, width, dtype=torch.bool)
        starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1  # (column 0 starts every row)
        bounds = torch.cat([starts.flatten().nonzero().flatten(), torch.tensor([rows * width])])
        spans: list[list[tuple[int, int]]] = [[] for _ in range(rows)]
        for s, e in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
            spans[s // width].append((s % width, e - s + s % width))
        longest = int((bounds[1:] - bounds[:-1]).max()) if rows * width else 0
        return cls(spans, bounds.to(torch.int32), longest)

    def on(self, device: torch.device) -> "Documents":
        """The same with ``cu_seqlens`` on ``device`` (an asynchronous copy from pinned memory on a GPU)."""
        if self.cu_seqlens.device == device:
            return self
        source = self.cu_seqlens.pin_memory() if device.type == "cuda" else self.cu_seqlens
        return replace(self, cu_seqlens=source.to(device, non_blocking=True))


def _repeat_kv(x: torch.Tensor, groups: int, dim: int = 1) -> torch.Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=dim)


@lru_cache(maxsize=1)
def varlen_kernel():
    """torch's varlen flash attention and the names of its parameters, or None where torch has none."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


def use_varlen(query: torch.Tensor, dropout: float) -> bool:
    """Does this call go through one varlen flash-attention kernel? (CUDA, half precision, no dropout: what
    flash attention covers.)"""
    return (query.is_cuda and query.dtype in (torch.bfloat16, torch.float16) and not dropout
            and query.shape[-1] <= 256 and varlen_kernel() is not None)


def varlen_attention(query, key, value, documents: Documents, scaling=None, kernel=None) -> torch.Tensor:
    """All documents of ``query`` [B, H, T, D] / ``key``, ``value`` [B, KV, T, D] in one varlen causal call
    over the batch flattened to ``B * T`` tokens -> [B, T, H, D]. ``kernel``: ``varlen_kernel()``'s pair."""
    fn, params = kernel or varlen_kernel()
    b, heads, t, d = query.shape
    q, k, v = (x.transpose(1, 2).reshape(b * t, x.shape[1], d) for x in (query, key, value))
    options = {"scale": scaling}
    # torch 2.9-2.11 take is_causal; later releases a (left, right) window, (-1, 0) being causal.
    options.update(window_size=(-1, 0)) if "window_size" in params else options.update(is_causal=True)
    if k.shape[1] != heads:
        if "enable_gqa" in params:
            options["enable_gqa"] = True
        else:
            k, v = _repeat_kv(k, heads // k.shape[1]), _repeat_kv(v, heads // v.shape[1])
    cu = documents.on(q.device).cu_seqlens
    out = fn(q, k, v, cu, cu, documents.max_length, documents.max_length, **options)
    return out.view(b, t, heads, d)


def sdpa_by_document(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                     is_causal=None, documents: Documents | None = None, ulysses=None, **kwargs):
    """transformers' attention-function signature: ``query`` [B, H, T, D], ``key``/``value`` [B, KV, T, D]
    -> ``([B, T, H, D], None)``. ``attention_mask`` is ignored when ``documents`` are given (``_call`` passes
    a placeholder then, so that transformers builds no mask).

    With ``ulysses`` (a sequence-parallel forward, ``sequence_parallel.forward_kwargs``) T is this rank's
    slice and ``documents`` are the whole rows': DeepSpeed's Ulysses attention gathers the sequence for
    a share of the heads and calls back here without ``ulysses``."""
    if ulysses is not None:
        return ulysses(module, query, key, value, None, dropout=dropout, scaling=scaling,
                       documents=documents, **kwargs)
    if documents is None or query.shape[2] != key.shape[2]:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    if use_varlen(query, dropout):
        return varlen_attention(query, key, value, documents, scaling), None
    groups = query.shape[1] // key.shape[1]
    key, value = _repeat_kv(key, groups), _repeat_kv(value, groups)
    rows = []
    for b, spans in enumerate(documents.spans):
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
