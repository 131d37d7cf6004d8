"""Liger's fused GPU kernels (``train.kernels=liger``): its RMSNorm, SwiGLU and RoPE patched into the model,
and its fused linear cross-entropy as the supervised LM head's per-token loss.

Everything here falls back: without liger-kernel (>= ``MIN_LIGER``), without CUDA, for a model type Liger
does not know or a head it cannot take, ``apply`` says why in one line and the model keeps its plain path.

The fused head (``fused_losses``) gives what the plain head gives, the fp32 cross-entropy of each supervised
row ``[N]`` with its own gradient, without ever holding ``[N, V]`` logits: Liger computes them chunk by chunk
(about ``N * H`` elements at a time) in forward, keeps only the losses, and recomputes the chunks in backward
to fold in each token's upstream gradient (which the loop's sequence normalisation and DFT make unequal).
"""

from __future__ import annotations

import functools
import inspect
import math
import sys
from importlib import metadata

import torch
import torch.nn.functional as F

# liger-kernel 0.8.0 and 0.8.1 accept reduction="none" but scale every token's gradient by the first token's
# upstream gradient (their backward multiplies by one scalar); 0.8.2 recomputes per token in backward.
MIN_LIGER = "0.8.2"
SILU = ("silu", "swish")  # the activations Liger's SwiGLU computes


@functools.cache
def _liger_missing() -> str | None:
    """Why Liger's kernels cannot run in this process, or None when they can (asked once per process)."""
    from packaging.version import Version

    try:
        version = metadata.version("liger-kernel")
    except metadata.PackageNotFoundError:
        return f"liger-kernel is not installed (pip install 'liger-kernel>={MIN_LIGER}')"
    if Version(version) < Version(MIN_LIGER):
        return f"liger-kernel {version} is older than {MIN_LIGER} (wrong weight gradients for per-token losses)"
    if not torch.cuda.is_available():
        return "no CUDA GPU (Liger's kernels are Triton kernels for GPUs)"
    try:
        import liger_kernel.transformers.functional
        import liger_kernel.transformers.monkey_patch  # noqa: F401
    except Exception as e:  # noqa: BLE001 - a triton or transformers it does not accept: fall back, say why
        return f"liger-kernel {version} cannot be imported ({type(e).__name__}: {e})"
    return None


def logit_transforms(model) -> tuple[float, float | None]:
    """``(scale, softcap)``: what ``model`` (bare Hugging Face) does to its head's logits, as
    ``softcap * tanh(scale * logits / softcap)`` (no cap when ``softcap`` is None); the same attributes that
    ``forward.head_logits`` applies: Cohere's ``logit_scale``, Granite's ``logits_scaling``, Gemma's
    ``final_logit_softcapping``."""
    scale = 1.0
    if getattr(model, "logit_scale", None) is not None:
        scale *= float(model.logit_scale)
    if getattr(model.config, "logits_scaling", None):
        scale /= float(model.config.logits_scaling)
    return scale, getattr(model.config, "final_logit_softcapping", None) or None


def fused_head_refusal(model) -> str | None:
    """Why Liger's fused cross-entropy cannot stand in for ``model``'s head, or None when it can.

    ``model`` is the bare Hugging Face model; asked after PEFT has wrapped it (``get_base_model()``), this
    also sees a LoRA adapter on the head, which ``apply`` (before PEFT) cannot.
    """
    head = model.get_output_embeddings()
    if type(head) is not torch.nn.Linear:  # a LoRA or modules_to_save wrapper has its own forward
        return f"the LM head is a {type(head).__module__}.{type(head).__qualname__}, not a plain nn.Linear"
    scale, _ = logit_transforms(model)
    # Liger caps logits but does not scale them; scaling the hidden rows instead is exact only by a power of
    # two (every product and sum then scales exactly) and only without a bias.
    if scale != 1.0 and (math.frexp(scale)[0] != 0.5 or head.bias is not None):
        return f"the model scales its logits by {scale:g} (not a power of two, or with a bias)"
    return None


def fused_head_available(model, kernels: str) -> bool:
    """Whether ``train.lm_head=supervised`` should take ``fused_losses`` for ``model`` (as in
    ``fused_head_refusal``)."""
    return kernels == "liger" and _liger_missing() is None and fused_head_refusal(model) is None


def _run_as_forward(module: torch.nn.Module, forward, *args):
    """``forward(module, *args)`` called as ``module(*args)``, i.e. through the module's hooks.

    ZeRO-3 keeps ``module.weight`` partitioned; DeepSpeed's forward pre-hook gathers it, its forward hook
    releases it and hangs a backward hook on the outputs that gathers it again before their gradient reaches
    the weight, so that the gradient lands on the whole weight and DeepSpeed reduces it to the partitions.
    A function that read ``module.weight`` outside a module call would see an empty partition.
    """
    own = vars(module).get("forward")  # another patch's per-instance forward, put back afterwards
    module.forward = functools.partial(forward, module)
    try:
        return module(*args)
    finally:
        if own is None:
            del module.forward
        else:
            module.forward = own


def _liger_head_forward(head: torch.nn.Linear, hidden: torch.Tensor, targets: torch.Tensor, *,
                        scale: float, softcap: float | None) -> torch.Tensor:
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    # Liger saves the weight it is given, detached, for its backward: under ZeRO-3 that keeps the gathered
    # copy alive from here to backward (one [V, H] per rank) although DeepSpeed re-partitions the parameter.
    if hidden.shape[0] == 0:
        # Liger divides by its chunk count, 0 here; the plain head keeps the graph through the weight that
        # every rank's backward needs (ZeRO-3 reduces the head's gradient collectively).
        return F.cross_entropy(F.linear(hidden, head.weight, head.bias).float(), targets, reduction="none")
    # Liger keeps its weight-gradient sum in the weight's dtype unless told otherwise: in bf16 that would
    # round once per chunk of ~N*H/V rows (hundreds of times at a 150k vocabulary), so it sums in fp32.
    return liger_fused_linear_cross_entropy(
        hidden * scale if scale != 1.0 else hidden, head.weight, targets, bias=head.bias,
        reduction="none", softcap=softcap, accum_dtype=torch.float32)


def fused_losses(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, *, scale: float = 1.0,
                 softcap: float | None = None) -> torch.Tensor | None:
    """Per-token cross-entropy of hidden rows under ``head`` with Liger's fused linear cross-entropy.

    Call it once with all the rows of a micro-batch: Liger chunks them itself, and under ZeRO-3 one head
    call per micro-batch keeps the ranks' collective gathers in step.

    Example::

        hidden [3, H], targets [7, 2, 9]  ->  [CE(head(h0), 7), CE(head(h1), 2), CE(head(h2), 9)]   (fp32)

    Args:
        head: The LM head, an ``nn.Linear``, possibly ZeRO-3 partitioned (called as a module: see
            ``_run_as_forward``).
        hidden: ``[N, H]`` final hidden states of the supervised positions, in the head's dtype.
        targets: ``[N]`` next-token ids (no ``-100``).
        scale, softcap: ``logit_transforms`` of the model (``fused_head_available`` has checked them).

    Returns:
        ``[N]`` fp32 losses with grad to ``hidden`` and the head's parameters; None where the fused kernel
        cannot run (liger-kernel missing, not on CUDA, another head type or dtype): take the plain path.
    """
    if (_liger_missing() is not None or type(head) is not torch.nn.Linear or not hidden.is_cuda
            or hidden.dtype != head.weight.dtype):
        return None
    return _run_as_forward(head, functools.partial(_liger_head_forward, scale=scale, softcap=softcap),
                           hidden, targets)


def _patch_layers(model) -> str:
    """Liger's kernels for ``model``'s family (except its cross-entropy), in place: what was patched, or why
    nothing was, with the model as it was."""
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    model_type = getattr(model.config, "model_type", None)
    patch = MODEL_TYPE_TO_APPLY_LIGER_FN.get(model_type)
    if patch is None:
        return f"model type {model_type!r} has no Liger kernels, its layers are left as they are"
    params = inspect.signature(patch).parameters
    # Our head computes the loss; Liger's cross-entropy patches would replace the model's forward with one
    # that returns no hidden states. Its SwiGLU rebinds the MLPs without checking their activation.
    silu = getattr(model.config.get_text_config(), "hidden_act", "silu") in SILU
    wanted = {"rope": True, "rms_norm": True, "swiglu": silu, "cross_entropy": False,
              "fused_linear_cross_entropy": False}
    kwargs = {name: on for name, on in wanted.items() if name in params}
    # Liger rebinds methods on the instances and swaps names in the family's modeling module: copies of both
    # let a patch that fails halfway leave the model as it was.
    modeling = vars(sys.modules[type(model).__module__])
    saved_modeling = dict(modeling)
    saved = [(m, {k: v.copy() if isinstance(v, dict) else v for k, v in vars(m).items()})
             for m in model.modules()]
    try:
        patch(model=model, **kwargs)
    except Exception as e:  # noqa: BLE001 - whatever broke, the model must be left as it was
        for module, state in saved:
            vars(module).clear()
            vars(module).update(state)
        modeling.update(saved_modeling)
        return f"Liger's {model_type} patch failed ({type(e).__name__}: {e}), its layers are left as they are"
    applied = [n for n, p in params.items() if kwargs.get(n, p.default) is True]
    return f"patched {model_type}'s {', '.join(applied) or 'nothing'}"


def apply(model, kernels: str) -> str:
    """Patch ``model`` in place with Liger's kernels when ``kernels == "liger"``.

    Liger's RoPE and its classes also replace names in the family's transformers module, so models of that
    family built later in this process get them too.

    Args:
        model: A bare Hugging Face causal LM, before PEFT and DeepSpeed wrap it.
        kernels: ``train.kernels``: ``none`` or ``liger``.

    Returns:
        One log line: what was patched and whether the supervised head's cross-entropy is fused, or why
        nothing was (the model untouched); ``""`` for ``none``.
    """
    if kernels != "liger":
        return ""
    missing = _liger_missing()
    if missing is not None:
        return f"train.kernels=liger: {missing}; nothing patched, the plain PyTorch path runs"
    layers = _patch_layers(model)
    refusal = fused_head_refusal(model)
    head = ("train.lm_head=supervised fuses its cross-entropy" if refusal is None
            else f"the head's cross-entropy stays plain: {refusal}")
    return f"train.kernels=liger (liger-kernel {metadata.version('liger-kernel')}): {layers}; {head}"
