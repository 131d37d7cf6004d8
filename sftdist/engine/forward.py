"""The model's forward pass for training and eval, ending in per-token losses of the supervised positions.

With ``train.lm_head=supervised`` (the default) the model returns its final hidden states and the LM head
and cross-entropy run only on the rows of supervised positions, so full-vocabulary logits of prompt,
padding and packed-prompt positions are never computed. On small models the head is most of the work
(hidden 256 with a 32k vocabulary: ~3/4 of the FLOPs), and on large vocabularies the ``[B, T, V]`` logits are
most of the activation memory. Rows go through the head in chunks of ``train.loss_chunk_tokens``; when a
micro-batch needs more than one chunk, each chunk's logits are recomputed in backward instead of kept
(not under ZeRO-3: see ``_partitioned``).
``train.lm_head=full`` computes all logits the way the model's own forward does.

``train.neftune_alpha`` adds NEFTune noise to the input embeddings of training forwards only (``neftune``).

The head is the model's own output-embedding module, called as a module, so ZeRO-3 gathers its partitioned
weight and LoRA adapters on it apply. What some models do to logits after the head (Gemma's soft-capping,
Cohere's and Granite's scaling) is applied here too; ``check_supervised_head`` compares the result with the
model's own logits once per run and falls back to ``full`` where they differ.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from sftdist.data.tokenize import IGNORE_INDEX
from sftdist.engine import adapter, attention, kernels, sequence_parallel
from sftdist.engine.loss import (
    at_supervised,
    dft,
    supervised_positions,
    supervised_token_losses,
    token_cross_entropy,
)


_bare = adapter.base_model


SUPERVISED_INDEX = "supervised_index"  # flat [B * T] positions of the supervised targets, found on the host
DOCUMENTS = "documents"  # the rows' attention.Documents, found on the host


def device_batch(batch: dict[str, torch.Tensor], device: torch.device) -> dict:
    """A collated host batch (this rank's slice of it under sequence parallelism) on ``device``, with what
    the forward would otherwise read back from the device found here first: the supervised positions
    (``SUPERVISED_INDEX``) and, for ``attention.NAME``, the documents (``DOCUMENTS``; from the whole rows'
    position ids). Reading a device tensor back (``.tolist()``, a boolean mask's index) stops the host until
    the GPU has caught up, once per micro-batch; from here on the loop only queues work. On a GPU the copies
    are asynchronous, from pinned memory.

    Example:
        >>> b = device_batch({"targets": torch.tensor([[-100, 5, 6], [7, -100, -100]]),
        ...                   "position_ids": torch.tensor([[0, 1, 2], [0, 1, 0]])}, torch.device("cpu"))
        >>> b[SUPERVISED_INDEX].tolist(), b[DOCUMENTS].spans
        ([1, 2, 3], [[(0, 3)], [(0, 2), (2, 3)]])
    """
    pinned = device.type == "cuda"
    out = {k: (v.pin_memory() if pinned else v).to(device, non_blocking=pinned) for k, v in batch.items()}
    index = supervised_positions(batch["targets"])
    out[SUPERVISED_INDEX] = (index.pin_memory() if pinned else index).to(device, non_blocking=pinned)
    out[DOCUMENTS] = _host_documents(batch, device)
    return out


def _host_documents(batch: dict, device: torch.device) -> attention.Documents:
    """The documents of a batch's (whole) rows, from its position ids on the host, ``cu_seqlens`` on
    ``device``."""
    positions = batch.get(sequence_parallel.FULL_POSITIONS, batch["position_ids"])
    return attention.Documents.from_positions(positions.cpu()).on(device)


def supervised_index(batch: dict) -> torch.Tensor:
    """The flat positions of a batch's supervised targets: ``device_batch``'s, else found on the device
    (which waits for it: eval and the tools take this path)."""
    return batch[SUPERVISED_INDEX] if SUPERVISED_INDEX in batch else supervised_positions(batch["targets"])


def _documents(model, batch: dict) -> attention.Documents | None:
    """The documents for ``attention.NAME``'s forward: ``device_batch``'s, else from the position ids."""
    if _bare(model).config._attn_implementation != attention.NAME:
        return None
    return batch[DOCUMENTS] if DOCUMENTS in batch else _host_documents(batch, batch["input_ids"].device)


def _call(model, batch: dict, **extra):
    """One forward of a collated batch; returns ``(output, (rows, width))``.

    ``use_cache=False`` is passed whatever the model's config says: transformers detects packed rows from
    the restarting position ids only when no cache is made, and with a cache attention would cross samples.
    Packed batches carry no attention_mask: transformers builds block-diagonal masks from those position
    ids (sdpa/eager). Under ``attention.NAME`` the documents go along instead, with an empty 4-D mask that
    transformers passes through as it is: it then builds no ``[B, 1, T, T]`` mask, and does not read the
    position ids back to look for packed rows. Flash attention reads sample boundaries from position ids only
    for a batch of one row, so packed rows are flattened into one row there (the caller reshapes back).
    """
    shape = tuple(batch["input_ids"].shape)
    documents = _documents(model, batch)
    if documents is not None:
        # (under sequence parallelism, this rank's slice of each row, with the whole rows' documents)
        extra |= sequence_parallel.forward_kwargs(batch, _bare(model).config.get_text_config(), documents)
        no_mask = torch.empty((shape[0], 1, 0, 0), dtype=torch.bool, device=batch["input_ids"].device)
        return model(input_ids=batch["input_ids"], attention_mask=no_mask, position_ids=batch["position_ids"],
                     use_cache=False, **extra), shape
    if "attention_mask" in batch:
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     position_ids=batch["position_ids"], use_cache=False, **extra), shape
    if _bare(model).config._attn_implementation.startswith("flash"):
        return model(input_ids=batch["input_ids"].view(1, -1), position_ids=batch["position_ids"].view(1, -1),
                     use_cache=False, **extra), shape
    out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False, **extra)
    return out, shape


def forward_logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """All logits ``[B, T, V]`` of a collated batch, from the model's own forward (``model``: the DeepSpeed
    engine, or a bare or PEFT-wrapped Hugging Face model)."""
    out, shape = _call(model, batch)
    return out.logits.view(*shape, -1)


def final_hidden(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The final (normed) hidden states ``[B, T, H]``, i.e. the LM head's input.

    The model's own head runs on one position per row only (``logits_to_keep=1``): the forward still goes
    through the engine's and the model's own ``forward`` (ZeRO-3 hooks, PEFT), and costs ``B x V`` there.
    """
    out, shape = _call(model, batch, output_hidden_states=True, logits_to_keep=1)
    return out.hidden_states[-1].view(*shape, -1)


def head_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """The model's logits for hidden rows ``[N, H]`` -> ``[N, V]`` in fp32, with the post-head transforms
    some architectures apply in their forward (see the module doc)."""
    bare = _bare(model)
    config = bare.config
    logits = bare.get_output_embeddings()(hidden).float()
    if getattr(bare, "logit_scale", None) is not None:  # Cohere
        logits = logits * bare.logit_scale
    if getattr(config, "logits_scaling", None):  # Granite
        logits = logits / config.logits_scaling
    if getattr(config, "final_logit_softcapping", None):  # Gemma 2/3
        cap = config.final_logit_softcapping
        logits = torch.tanh(logits / cap) * cap
    return logits


def _partitioned(model) -> bool:
    """Is the head's weight a ZeRO-3 partition? Then every head call gathers it collectively, and ranks
    with different numbers of supervised tokens would make different numbers of calls: one call per
    micro-batch keeps them in step."""
    return hasattr(_bare(model).get_output_embeddings().weight, "ds_id")


def _chunk_losses(model, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head_logits(model, hidden)
    if logits.requires_grad and logits._base is None and logits.grad_fn is not None:
        # head_logits made a fresh fp32 tensor that nothing else holds: backward may reuse its storage.
        return token_cross_entropy(logits, targets)
    return F.cross_entropy(logits, targets, reduction="none")


def supervised_losses(model, batch: dict, *, lm_head: str = "supervised", chunk_tokens: int = 8192,
                      fused: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy (fp32) of every supervised position of a collated batch.

    Example::

        targets = [[7, -100, 2]]  ->  losses = [CE(head(h[0,0]), 7), CE(head(h[0,2]), 2)],  index = [0, 2]

    Args:
        model: The DeepSpeed engine, or a bare or PEFT-wrapped Hugging Face causal LM.
        batch: ``collate``/``collate_packed`` output on the model's device (best through ``device_batch``);
            ``targets`` [B, T] are the shifted next-token ids, ``-100`` where not supervised.
        lm_head: ``supervised`` (head only on supervised rows) or ``full`` (the model's own logits).
        chunk_tokens: Supervised rows per head/cross-entropy chunk (``supervised`` only).
        fused: Take Liger's fused linear cross-entropy for the head (``kernels.fused_losses``; ``supervised``
            only), which never holds ``[N, V]`` logits; where it cannot run, the plain head does.

    Returns:
        ``(losses, index)``: losses [N] with grad, N = supervised positions in row-major order; index [N]
        their flat positions in the [B, T] batch (``at_supervised`` picks other per-position values there).
    """
    index = supervised_index(batch)
    if lm_head == "full":
        return supervised_token_losses(forward_logits(model, batch), batch["targets"], index)
    rows, wanted = at_supervised(final_hidden(model, batch), index), at_supervised(batch["targets"], index)
    if fused:
        bare = _bare(model)
        scale, softcap = kernels.logit_transforms(bare)
        losses = kernels.fused_losses(bare.get_output_embeddings(), rows, wanted, scale=scale, softcap=softcap)
        if losses is not None:
            return losses, index
    if rows.shape[0] <= chunk_tokens or _partitioned(model):
        return _chunk_losses(model, rows, wanted), index
    # Several chunks: keep only each chunk's input and recompute its [chunk, V] logits in backward.
    return torch.cat([checkpoint(_chunk_losses, model, h, t, use_reentrant=False)
                      for h, t in zip(rows.split(chunk_tokens), wanted.split(chunk_tokens))]), index


def check_supervised_head(model, batch: dict[str, torch.Tensor], *, rtol: float = 1e-2) -> str | None:
    """Compare the supervised head's logits with the model's own on one batch, without gradients.

    Returns ``None`` when they agree to ``rtol`` of the logits' largest magnitude (bf16 GEMMs of other
    shapes differ by ~1e-3), else a sentence saying how far apart they are or why the check failed. Every
    rank must call it on the same schedule: under ZeRO-3 both forwards gather parameters collectively.

    The check runs on ``check_slice(batch)``: the model's own forward materialises every logit, and a whole
    micro-batch's ``[B, T, V]`` (four copies, in fp32, at a 152k vocabulary) can exhaust memory that
    training, which never holds them, fits in.
    """
    batch = check_slice(batch)
    mask = batch["targets"] != IGNORE_INDEX
    with torch.no_grad():
        full = forward_logits(model, batch)[mask].float()
        try:
            mine = head_logits(model, final_hidden(model, batch)[mask])
        except (TypeError, AttributeError, ValueError) as e:  # no logits_to_keep / hidden states / head
            return f"the model's forward cannot return hidden states for the head ({type(e).__name__}: {e})"
    if mine.shape != full.shape:
        return f"the head gives logits of shape {tuple(mine.shape)}, the model {tuple(full.shape)}"
    diff = (mine - full).abs().max().item() if full.numel() else 0.0
    scale = full.abs().max().item() if full.numel() else 0.0
    if not math.isfinite(diff) or diff > rtol * max(scale, 1.0):
        return f"its logits differ from the model's own by up to {diff:.3g} (largest logit {scale:.3g})"
    return None


def check_slice(batch: dict[str, torch.Tensor], *, min_tokens: int = 64) -> dict[str, torch.Tensor]:
    """The first row of a collated batch with supervised positions, cut after its first two (and after at
    least ``min_tokens``): a causal model's logits of a prefix are those of the whole row, so the head check
    sees the same values at a fraction of the memory.

    Example:
        >>> batch = {"input_ids": torch.arange(12).view(2, 6), "targets": torch.tensor(
        ...     [[-100] * 6, [-100, -100, 5, 6, 7, -100]])}
        >>> {k: v.tolist() for k, v in check_slice(batch, min_tokens=2).items()}
        {'input_ids': [[6, 7, 8, 9]], 'targets': [[-100, -100, 5, 6]]}
    """
    supervised = batch["targets"] != IGNORE_INDEX
    row = int(supervised.any(dim=1).int().argmax())  # (0 when no row has any)
    positions = supervised[row].nonzero().flatten().tolist()
    end = max(min_tokens, positions[min(len(positions), 2) - 1] + 1 if positions else 0)
    return {k: v[row:row + 1, :end] for k, v in batch.items() if k not in (SUPERVISED_INDEX, DOCUMENTS)}


def neftune_noise(embeds: torch.Tensor, alpha: float, length: int) -> torch.Tensor:
    """``embeds`` plus NEFTune noise: uniform in ``[-b, b]`` with ``b = alpha / sqrt(length * hidden)``
    (Jain et al. 2023), drawn from torch's default generator of the tensor's device, whose state every
    checkpoint saves and a resume restores, so a resumed run draws the same noise.

    Example:
        >>> x = torch.zeros(1, 4, 16)
        >>> bool(neftune_noise(x, 5.0, 4).abs().max() <= 5.0 / (4 * 16) ** 0.5)
        True
    """
    bound = alpha / math.sqrt(length * embeds.shape[-1])
    return embeds + torch.empty_like(embeds).uniform_(-bound, bound)


@contextmanager
def neftune(model, alpha: float, length: int) -> Iterator[None]:
    """Within the block, the model's input-embedding module returns ``neftune_noise`` of its output while it
    is in training mode; in eval mode (eval passes, generation) and with ``alpha`` 0 it is untouched.

    The hook sits on the module ``get_input_embeddings`` returns (a LoRA adapter's too, or the ZeRO-3
    partitioned module after its gather), only for the block, so a forward outside it (``generate``, the
    head check, an export) never sees noise. ``length`` is the row width of the collated micro-batch (a
    packed row with packing), not the width the module sees: that is ``B * T`` for flash attention's one
    flattened row, and a slice of ``T`` under sequence parallelism.
    """
    if not alpha:
        yield
        return

    def add_noise(module, args, output):
        return neftune_noise(output, alpha, length) if module.training else None

    handle = _bare(model).get_input_embeddings().register_forward_hook(add_noise)
    try:
        yield
    finally:
        handle.remove()


@dataclass(frozen=True)
class LossHead:
    """How the loop turns a batch into token losses and its objective: ``train.lm_head`` and
    ``train.loss_chunk_tokens`` (after ``check_supervised_head`` has had its say), ``train.loss``,
    ``train.loss_normalization`` and ``train.neftune_alpha``."""

    mode: str = "supervised"
    chunk_tokens: int = 8192
    loss: str = "ce"  # ce | dft: the objective's transform of each token's cross-entropy (``objective``)
    normalization: str = "token"  # token | sequence: for ``loss.token_weights`` and ``loss.loss_denominator``
    neftune_alpha: float = 0.0  # NEFTune noise on the input embeddings of training forwards (0 = off)
    fused: bool = False  # Liger's fused linear cross-entropy as the supervised head (train.kernels=liger)

    def losses(self, model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``supervised_losses`` with this head: the plain cross-entropy of each supervised position (what
        ``loss`` and ``eval_loss`` report), with NEFTune noise when the model is training, scaled by the
        whole rows' width (a sequence-parallel slice carries its rows' position ids)."""
        width = batch.get(sequence_parallel.FULL_POSITIONS, batch["input_ids"]).shape[1]
        with neftune(model, self.neftune_alpha, width):
            return supervised_losses(model, batch, lm_head=self.mode, chunk_tokens=self.chunk_tokens,
                                     fused=self.fused)

    def objective(self, token_losses: torch.Tensor) -> torch.Tensor:
        """What training minimises per token, before ``loss.token_weights``: the cross-entropy (``ce``) or
        ``loss.dft`` of it."""
        return dft(token_losses) if self.loss == "dft" else token_losses

    @property
    def reweighted(self) -> bool:
        """The objective is not the token-mean cross-entropy (then the loop logs it as ``objective``)."""
        return self.loss != "ce" or self.normalization != "token"
