"""``train.compile``: each decoder layer's forward compiled in place with torch.compile, attention left out.

Packed micro-batches change width from batch to batch, and attention by document (``attention.NAME``) gets
host-side ``documents`` (per-row Python lists of spans, ``cu_seqlens``, the longest length): a compiled
layer that saw those would guard on their lengths and values and compile again for nearly every batch. So
each layer is compiled with dynamic shapes, and every keyword argument a layer gets that is not a tensor, a
tuple of tensors, a bool or None (the documents, the sequence-parallel callback) reaches the compiled code
only inside an opaque box (``HostArgument``). The registered attention function is replaced by a
``torch.compiler.disable``-d wrapper that opens the boxes: the graph breaks there, and attention runs as it
does uncompiled. (transformers' own wrappers add breaks too: a Llama layer compiles to 4 graphs, which
all layers of a model share.)

The layer's ``forward`` is compiled rather than its ``__call__`` (what ``nn.Module.compile`` does): the
hooks on the layer itself (DeepSpeed ZeRO-3's parameter gathering, transformers' output capturing) then
run eagerly around the compiled code instead of adding graph breaks to it, and the module, its parameter
names and its state dict stay as they were. On CPU in fp32 it gains nothing (bench/RESULTS.md,
compile_blocks: the layers' time is in their matmuls), so it is off by default.
"""

from __future__ import annotations

import functools

import torch

from sftdist.engine import adapter


class HostArgument:
    """A host-side value (the documents, a callback) carried through compiled code without being looked at:
    dynamo guards only on this box's type, so new spans or widths never trigger a recompile."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value


def _device_side(value) -> bool:
    """Values the layer's own code may compute with, and which dynamo handles without per-batch guards."""
    if value is None or isinstance(value, (bool, torch.Tensor)):
        return True
    return isinstance(value, tuple) and all(isinstance(v, torch.Tensor) for v in value)


def _opened(value):
    return value.value if isinstance(value, HostArgument) else value


@functools.cache
def _opaque_attention(attention_function):
    """``attention_function`` behind a graph break, taking its host-side arguments out of their boxes
    (cached: one wrapper per function, so that compiled code's identity guard on it keeps holding)."""

    @torch.compiler.disable
    def attend(*args, **kwargs):
        return attention_function(*map(_opened, args), **{k: _opened(v) for k, v in kwargs.items()})

    attend.sftdist_opaque = True
    return attend


def _keep_attention_opaque(implementation: str) -> None:
    """Register the disabled wrapper of whatever ``implementation`` names now. Checked on every layer call,
    since ``attention.register()`` may register the bare function again after ``compile_blocks``."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    current = ALL_ATTENTION_FUNCTIONS.get(implementation)
    if current is not None and not getattr(current, "sftdist_opaque", False):
        AttentionInterface.register(implementation, _opaque_attention(current))


def _inner_forward(layer):
    """``(the layer's own forward, bound; whether transformers checkpoints it)``. A
    ``GradientCheckpointingLayer``'s class forward is a wrapper that calls ``torch.utils.checkpoint``, which
    dynamo does not trace into: compiled above it, a checkpointed layer would run wholly eagerly."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    wrapper = type(layer).forward
    if isinstance(layer, GradientCheckpointingLayer) and hasattr(wrapper, "__wrapped__"):
        return wrapper.__wrapped__.__get__(layer), True
    return layer.forward, False


def _compile_layer(layer, config, backend: str) -> None:
    inner, checkpointable = _inner_forward(layer)
    # dynamic=True: the width (and the last micro-batch's row count) changes from batch to batch, and a
    # shape-specialised graph would be compiled again for each one.
    compiled = torch.compile(inner, dynamic=True, backend=backend)

    @functools.wraps(inner)
    def forward(*args, **kwargs):
        _keep_attention_opaque(config._attn_implementation)
        kwargs = {k: v if _device_side(v) else HostArgument(v) for k, v in kwargs.items()}
        # transformers' checkpointing wrapper, minus its KV-cache clean-up (training forwards pass no cache).
        if checkpointable and layer.gradient_checkpointing and layer.training and torch.is_grad_enabled():
            return layer._gradient_checkpointing_func(functools.partial(compiled, **kwargs), *args)
        return compiled(*args, **kwargs)

    layer.forward = forward
    layer._sftdist_compiled = True


def decoder_layers(model) -> torch.nn.ModuleList | None:
    """The decoder layers of a bare or PEFT-wrapped Hugging Face model: ``get_decoder().layers`` (Llama,
    Qwen2, Mistral, ...), else the ``ModuleList`` of the model's ``_no_split_modules`` classes."""
    bare = adapter.base_model(model)
    layers = getattr(bare.get_decoder(), "layers", None) if hasattr(bare, "get_decoder") else None
    if isinstance(layers, torch.nn.ModuleList) and len(layers):
        return layers
    block_classes = set(getattr(bare, "_no_split_modules", None) or ())
    return next((m for m in bare.modules() if isinstance(m, torch.nn.ModuleList) and len(m)
                 and all(type(layer).__name__ in block_classes for layer in m)), None)


def compile_blocks(model, *, backend: str = "inductor") -> str:
    """Compile every decoder layer's forward of ``model`` in place (before DeepSpeed wraps it).

    Args:
        model: A bare or PEFT-wrapped Hugging Face causal LM.
        backend: torch.compile's backend (``eager``/``aot_eager`` check the wrapping without inductor's
            compile time).

    Returns:
        One line for the log: what was compiled, or why nothing was.
    """
    layers = decoder_layers(model)
    if layers is None:
        return f"train.compile: no decoder layers found in {type(model).__name__}; running eagerly"
    bare = adapter.base_model(model)
    config = bare.config.get_text_config()
    for layer in layers:
        if not getattr(layer, "_sftdist_compiled", False):
            _compile_layer(layer, config, backend)
    return (f"train.compile: {len(layers)} x {type(layers[0]).__name__} compiled ({backend}, dynamic shapes; "
            f"attention {config._attn_implementation} runs uncompiled)")
