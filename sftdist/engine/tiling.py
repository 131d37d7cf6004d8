"""ALST's tiled MLP (``parallelism.tiled_mlp``): each decoder layer's MLP runs over tiles of its input's
positions, and its backward recomputes one tile at a time, so a layer never holds the ``[T, intermediate]``
gate/up/activation tensors of a whole long sequence (3 x 2.7 x hidden per token on Llama shapes, more than
the rest of the layer's activations together).

DeepSpeed's ``TiledMLP`` does the tiling and tells ZeRO to wait for the last tile before reducing a weight's
gradient. It costs one more MLP forward per step, so it is for sequences whose MLP activations matter:
``auto`` tiles once a rank's share of a row reaches ``AUTO_FROM_TOKENS`` (bench/sequence_parallel.py).
"""

from __future__ import annotations

import math
import types

import torch

AUTO_FROM_TOKENS = 8192  # per-rank tokens of a row from which ``auto`` tiles (measured: bench/RESULTS.md)
MLP_PARTS = ("gate_proj", "up_proj", "down_proj", "act_fn")  # Llama, Mistral, Qwen2/3, Gemma, OLMo 2, Granite


def wanted(setting: str, local_tokens: int) -> bool:
    """Does ``parallelism.tiled_mlp`` (auto | true | false) tile rows of ``local_tokens`` per rank?

    Example:
        >>> wanted("auto", 4096), wanted("auto", 16384), wanted("true", 64)
        (False, True, True)
    """
    return setting == "true" or (setting == "auto" and local_tokens >= AUTO_FROM_TOKENS)


def tile_count(tokens: int, hidden: int) -> int:
    """Tiles of about ``hidden`` positions each, ALST's choice: a tile's ``[tile, intermediate]`` tensors are
    then no larger than a layer's ``[hidden, intermediate]`` weight.

    Example:
        >>> tile_count(16384, 4096), tile_count(100, 4096)
        (4, 1)
    """
    return max(1, math.ceil(tokens / hidden))


def tile_mlps(model) -> int:
    """Make every gated MLP of ``model`` (a bare or PEFT-wrapped Hugging Face model) run tiled; returns how
    many. Call before DeepSpeed wraps the model."""
    count = 0
    for module in model.modules():
        if all(hasattr(module, part) for part in MLP_PARTS) and not getattr(module, "_sftdist_tiled", False):
            module.forward = types.MethodType(_tiled_forward, module)
            module._sftdist_tiled = True
            count += 1
    return count


def _mlp(module, x: torch.Tensor) -> torch.Tensor:
    return module.down_proj(module.act_fn(module.gate_proj(x)) * module.up_proj(x))


def _tiled_forward(module, x: torch.Tensor) -> torch.Tensor:
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

    tiles = tile_count(x.shape[-2], x.shape[-1])
    params = [p for p in module.parameters() if p.requires_grad]
    if any(hasattr(p, "ds_id") for p in module.parameters()) and torch.distributed.is_initialized():
        # ZeRO-3 gathers the weights at every tile's call, collectively: every rank must run as many tiles
        agreed = torch.tensor(tiles, device=x.device)
        torch.distributed.all_reduce(agreed, op=torch.distributed.ReduceOp.MAX)
        tiles = int(agreed)
    if tiles == 1 or not torch.is_grad_enabled():
        return _mlp(module, x)
    return TiledMLP.apply(_mlp, module, x, tiles, params)
