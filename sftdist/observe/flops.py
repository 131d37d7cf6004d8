"""Model FLOPs of a training step and the peak FLOP/s they are measured against, for the ``mfu`` metric.

MFU (model FLOPs utilisation, PaLM appendix B) = model FLOPs of a step / (step seconds x peak FLOP/s of
the devices). Model FLOPs are those of the matmuls the model needs, counted from parameter counts; work
the run adds on top (activation recompute under gradient checkpointing, padding) does not count, so the
same model and batch give the same FLOPs whatever the kernels and memory settings. For one step:

    step_flops = body + attention + head
    body       = (6 * trainable_params + 4 * frozen_params) * tokens
    attention  = 12 * layers * attention_dim * attention_work
    head       = (6 if head_trainable else 4) * head_params * head_tokens

- body: a weight matrix costs 2 FLOPs per parameter per token forward (one multiply-add). Backward costs
  2 more for the gradient with respect to the activations and, for trainable weights only, 2 more for the
  gradient with respect to the weight: 6 for trainable parameters, 4 for frozen ones (a LoRA base model,
  whose activation gradients are still needed to reach the adapters below). LoRA adapter weights count as
  trainable body parameters. ``tokens`` are the non-padding tokens.
- attention: the score (Q K^T) and value (P V) matmuls have no weights, so parameter counts miss them.
  For a document of n tokens each costs 2 * n^2 * attention_dim per layer forward, 4 * n^2 * attention_dim
  together, and backward twice that: 12 * layers * attention_dim * n^2, counted over the full n x n square
  as PaLM does (not the causal half, and regardless of sliding windows). ``attention_work`` is the sum of
  n^2 over the documents of the step (a packed row holds several documents; see ``attention_work``).
- head: the LM head (hidden x vocab) runs only where logits are computed (``head_tokens``: every
  non-padding token, or only the supervised ones when the loop skips the rest), 6 per parameter when it
  trains, 4 when frozen. A head tied to the input embedding still counts here, in full.

Body parameters are all parameters except the input embedding, any other embedding lookup table (a
lookup is not a matmul) and the LM head. Norm weights and biases are included although they are not
matmul weights: for chat models they are well under 0.1% of the body. In a mixture of experts only
``num_experts_per_tok`` of the experts run for a token, so parameters named ``*.experts.*`` count
``num_experts_per_tok / num_experts`` of their size.

Worked example (1 layer, hidden 2, 1 head, feed-forward 4, vocabulary 10, full fine-tuning, untied head):
body = 2*2 (q) + 2*2 (k) + 2*2 (v) + 2*2 (o) + 3 * 2*4 (gate, up, down) + 3 * 2 (two norms in the
layer, one after it) = 46 parameters; head = 2 * 10 = 20. A step over one document of 3 tokens, the head
on all 3: 6*46*3 + 12*1*2*3^2 + 6*20*3 = 828 + 216 + 360 = 1404 FLOPs.

    >>> FlopsModel(trainable_params=46, frozen_params=0, head_params=20, head_trainable=True, layers=1,
    ...            attention_dim=2).step_flops(tokens=3, attention_work=9, head_tokens=3)
    1404.0

Importing this module does not import DeepSpeed or wandb.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Optional

import torch

from sftdist.data.collate import PAD_SOURCE


@dataclass(frozen=True)
class FlopsModel:
    """Model FLOPs of one training step, from the model's parameter counts (PaLM / Megatron convention).

    See the module docstring for the formula and what each count holds.

    Attributes:
        trainable_params: Body parameters (all but embeddings and the LM head) that get gradients,
            LoRA adapters included; experts scaled to the active ones.
        frozen_params: Body parameters without gradients (a LoRA base model), scaled the same way.
        head_params: LM head parameters, hidden x vocab (counted even when tied to the input embedding).
        head_trainable: Whether the LM head gets a weight gradient.
        layers: ``num_hidden_layers``.
        attention_dim: ``num_attention_heads * head_dim``, the width of the attention scores' dot products.
    """

    trainable_params: int
    frozen_params: int
    head_params: int
    head_trainable: bool
    layers: int
    attention_dim: int

    def step_flops(self, tokens: int, attention_work: int, head_tokens: int) -> float:
        """FLOPs of the forward and backward pass over one step's batch (all micro-batches it sums).

        Example (the module docstring's model; 5 tokens in documents of 3 and 2, head on 2 tokens):
            >>> m = FlopsModel(trainable_params=46, frozen_params=0, head_params=20, head_trainable=True,
            ...                layers=1, attention_dim=2)
            >>> m.step_flops(tokens=5, attention_work=3 * 3 + 2 * 2, head_tokens=2)  # 1380 + 312 + 240
            1932.0

        Args:
            tokens: Non-padding tokens.
            attention_work: Sum over documents of length n of n^2 (``attention_work``).
            head_tokens: Positions where the LM head runs.

        Returns:
            The step's model FLOPs.
        """
        body = (6 * self.trainable_params + 4 * self.frozen_params) * tokens
        attention = 12 * self.layers * self.attention_dim * attention_work
        head = (6 if self.head_trainable else 4) * self.head_params * head_tokens
        return float(body + attention + head)


def _full_numel(param: torch.nn.Parameter) -> int:
    # Under ZeRO-3 a rank holds only its partition: numel() is 0 and ds_numel is the full size.
    return int(getattr(param, "ds_numel", param.numel()))


def _active_experts(config) -> tuple[int, int]:
    """(experts run per token, experts per layer) of a mixture-of-experts config; (1, 1) for a dense one."""
    per_token = getattr(config, "num_experts_per_tok", None)
    experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)
    return (per_token, experts) if per_token and experts else (1, 1)


def flops_model(model) -> FlopsModel:
    """Count the parameters of ``model`` by role for ``FlopsModel``.

    Works on a transformers ``PreTrainedModel``, a peft ``PeftModel`` around one, and under DeepSpeed
    ZeRO-3 (partitioned parameters report their full size in ``ds_numel``). The LM head is
    ``model.get_output_embeddings()``; parameters are told apart by object identity, so a head tied to
    the input embedding is one parameter, counted as head and never as body.

    Example (the module docstring's model: 46 body parameters, a 10 x 2 head):
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> cfg = LlamaConfig(hidden_size=2, num_hidden_layers=1, num_attention_heads=1,
        ...                   num_key_value_heads=1, intermediate_size=4, vocab_size=10,
        ...                   tie_word_embeddings=False)
        >>> m = flops_model(LlamaForCausalLM(cfg))
        >>> m.trainable_params, m.frozen_params, m.head_params, m.head_trainable, m.attention_dim
        (46, 0, 20, True, 2)

    Args:
        model: The model, before or after ``deepspeed.initialize`` (pass the engine's ``module``).

    Returns:
        The parameter counts and attention shape.
    """
    config = model.config
    head = model.get_output_embeddings()
    head_ids = {id(p) for p in head.parameters()} if head is not None else set()
    lookup_ids = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    embedding = model.get_input_embeddings()
    if embedding is not None:
        lookup_ids |= {id(p) for p in embedding.parameters()}

    head_params, head_trainable = 0, False
    dense = {True: 0, False: 0}  # requires_grad -> parameters
    experts = {True: 0, False: 0}
    for name, param in model.named_parameters():  # a tied weight is yielded once
        if id(param) in head_ids:
            head_params += _full_numel(param)
            head_trainable |= param.requires_grad
        elif id(param) not in lookup_ids:
            counts = experts if ".experts." in name else dense
            counts[param.requires_grad] += _full_numel(param)

    per_token, num_experts = _active_experts(config)
    # Every expert of a layer has the same size, so the division is exact.
    trainable = dense[True] + experts[True] * per_token // num_experts
    frozen = dense[False] + experts[False] * per_token // num_experts
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return FlopsModel(trainable_params=trainable, frozen_params=frozen, head_params=head_params,
                      head_trainable=head_trainable, layers=config.num_hidden_layers,
                      attention_dim=heads * head_dim)


def attention_work(position_ids: torch.Tensor, token_source: torch.Tensor) -> int:
    """Sum of n^2 over the documents of a collated batch, n a document's length in tokens.

    A document starts wherever the position id does not go up by one (``collate`` and ``collate_packed``
    restart it at 0 for every example and for the padding tail), as in ``attention.document_spans``;
    padding tokens (``token_source`` -1) count in no document.

    Example (one packed row: documents of 3 and 2 tokens, then one padding slot):
        >>> attention_work(torch.tensor([[0, 1, 2, 0, 1, 0]]), torch.tensor([[0, 0, 0, 1, 1, -1]]))
        13

    Args:
        position_ids: Long tensor [B, T] from ``sftdist.data.collate``.
        token_source: Long tensor [B, T], -1 on padding.

    Returns:
        The sum, as an int.
    """
    real = token_source != PAD_SOURCE
    starts = torch.ones_like(real)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    document = torch.cumsum(starts.flatten().long(), 0) - 1
    lengths = torch.bincount(document[real.flatten()], minlength=1)
    return int((lengths * lengths).sum())


# Dense (no 2:4 sparsity) bf16 tensor-core FLOP/s per device, keyed by a fragment of
# torch.cuda.get_device_name(). Datasheets quote "with sparsity" figures, twice these; Ada and Ampere
# GeForce cards are quoted with FP32 accumulation (what PyTorch uses), half their FP16-accumulate rate.
# For all of these fp16 runs at the same rate as bf16.
PEAK_BF16_FLOPS: dict[str, float] = {
    # NVIDIA A100 datasheet: BF16 Tensor Core 312 TFLOPS (624 with sparsity), SXM and PCIe alike.
    "A100": 312e12,
    "A800": 312e12,  # export variant of the A100, same tensor cores (A800 datasheet: BF16 312 TFLOPS)
    # NVIDIA H100 datasheet: BF16 Tensor Core 1,979 (SXM) / 1,513 (PCIe) / 1,671 (NVL) TFLOPS with sparsity.
    "H100": 989e12,
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H800": 989e12,  # export variant of the H100 SXM (NVLink cut, tensor cores unchanged)
    "H800 PCIe": 756e12,
    "GH200": 989e12,  # GH200 datasheet: the Hopper GPU of an H100 SXM, BF16 1,979 TFLOPS with sparsity
    # NVIDIA H200 datasheet: BF16 Tensor Core 1,979 (SXM) / 1,671 (NVL) TFLOPS with sparsity.
    "H200": 989e12,
    "H200 NVL": 835e12,
    # NVIDIA HGX B200 (1,000 W): BF16 4.5 PFLOPS with sparsity; GB200 (1,200 W): 5 PFLOPS with sparsity.
    "B200": 2250e12,
    "GB200": 2500e12,
    # NVIDIA L40S / L40 datasheets: BF16 Tensor Core 733 / 362.1 TFLOPS with sparsity.
    "L40S": 362e12,
    "L40": 181e12,
    "L4": 121e12,  # NVIDIA L4 datasheet: BF16 Tensor Core 242 TFLOPS with sparsity
    "A10": 125e12,  # NVIDIA A10 datasheet: BF16 Tensor Core 125 TFLOPS (250 with sparsity)
    # AWS's A10G (g5 instances) has no public NVIDIA datasheet; AWS and Baseten ("NVIDIA A10 vs A10G")
    # give 70 TFLOPS FP16 tensor, consistent with 80 SMs at 1.71 GHz at the GeForce half rate.
    "A10G": 70e12,
    # NVIDIA RTX A6000 datasheet: Peak BF16 Tensor TFLOPS with FP32 accumulate 154.8 (309.7 with sparsity).
    "RTX A6000": 154.8e12,
    "A6000": 154.8e12,
    # NVIDIA Ada whitepaper, RTX 4090: Peak BF16 Tensor TFLOPS with FP32 accumulate 165.2 (330.3 sparse).
    "RTX 4090": 165.2e12,
    # NVIDIA Ampere GA102 whitepaper, RTX 3090: Peak BF16 Tensor TFLOPS with FP32 accumulate 71 (142 sparse).
    "RTX 3090": 71e12,
    # AMD Instinct MI300X / MI325X data sheets: peak BF16 1,307.4 TFLOPS dense (2,614.9 with sparsity).
    "MI300X": 1307.4e12,
    "MI325X": 1307.4e12,
    # AMD Instinct MI250X / MI250 data sheets: peak BF16 383 / 362.1 TFLOPS (no sparsity on CDNA 2).
    "MI250X": 383e12,
    "MI250": 362.1e12,
}

# Devices whose tensor cores do fp16 but not bf16 (bf16 there runs far slower and gets no peak).
PEAK_FP16_ONLY_FLOPS: dict[str, float] = {
    "V100": 125e12,  # NVIDIA V100 datasheet: Tensor Performance 125 TFLOPS (SXM2)
    "V100-PCIE": 112e12,  # the same datasheet, PCIe card: 112 TFLOPS
}


def _lookup(device_name: str, table: dict[str, float]) -> Optional[float]:
    """The value of the longest key of ``table`` found in ``device_name`` (case ignored) and not followed
    by a letter or digit there, so that "A10" matches neither "A100" nor "A10G" and "H100 PCIe" wins over
    "H100"."""
    name = device_name.lower()
    found = [key for key in table if re.search(rf"{re.escape(key.lower())}(?![a-z0-9])", name)]
    return table[max(found, key=len)] if found else None


def peak_flops_per_device(device_name: str, precision: str) -> Optional[float]:
    """Dense tensor-core peak FLOP/s of one device for bf16 or fp16 training, from ``PEAK_BF16_FLOPS``.

    Example:
        >>> peak_flops_per_device("NVIDIA H100 PCIe", "bf16")
        756000000000000.0
        >>> peak_flops_per_device("NVIDIA A100-SXM4-80GB", "fp32") is None
        True

    Args:
        device_name: ``torch.cuda.get_device_name()``, e.g. "NVIDIA H100 80GB HBM3".
        precision: "bf16" or "fp16"; anything else (fp32) has no table value.

    Returns:
        FLOP/s, or None for an unknown device, a device without bf16 tensor cores asked for bf16, or
        another precision (the caller then needs the peak from its config).
    """
    if precision == "bf16":
        return _lookup(device_name, PEAK_BF16_FLOPS)
    if precision == "fp16":
        return _lookup(device_name, {**PEAK_BF16_FLOPS, **PEAK_FP16_ONLY_FLOPS})
    return None


def measured_matmul_peak(size: int = 1024, repeats: int = 5) -> float:
    """fp32 FLOP/s of one ``size`` x ``size`` CPU matmul on this process's threads, the best of ``repeats``.

    For MFU on CPU, which has no datasheet peak to look up: 2 * size^3 FLOPs over the fastest run, after
    one untimed run that pays for thread start-up and first-touch page faults.

    Args:
        size: Matrix side.
        repeats: Timed runs.

    Returns:
        FLOP/s.
    """
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best
