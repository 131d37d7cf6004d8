"""Per-rank memory of a training setup, from parameter counts and shapes alone (pure arithmetic).

Model states, in bytes per parameter, for Adam (two fp32 moments) and ``N`` data-parallel ranks. The
bf16/fp16 rows are DeepSpeed's own accounting (``estimate_zero2_model_states_mem_needs``: "2 = params_16bit,
18 = 2_grads_16bit + 4_grads_32bit + 4_params_32bit + 8_optimizer_states_32bit"); the fp32 rows are what
``bench/zero_memory.py`` measured on CPU:

    =======  ===========================  =================================  ===========================
    stage    params                       grads                              optimizer (master + moments)
    =======  ===========================  =================================  ===========================
    mixed precision (bf16/fp16)
    0        2                            2 + 4 (fp32 copy at the step)      4 + 8
    1        2                            2 + 4/N  (bf16: 2 + 4, see below)  (4 + 8)/N
    2        2                            (2 + 4)/N                          (4 + 8)/N
    3        2/N (+ 4 x largest module)   (2 + 4)/N                          (4 + 8)/N
    fp32
    0        4                            4                                  8 (no master copy)
    1        4                            4                                  (4 + 8)/N
    2        4                            4/N                                (4 + 8)/N
    3        4/N (+ 4 x largest module)   (4 + 4)/N                          (4 + 8)/N
    =======  ===========================  =================================  ===========================

- ZeRO-1 in bf16 with fp32 gradient accumulation (sftdist's ``grad_accum_dtype=auto``) runs DeepSpeed's
  ``BF16_Optimizer``, which keeps an unpartitioned fp32 gradient of every parameter.
- ZeRO 1-3 keep an fp32 master copy even in an fp32 run; ZeRO-3 holds the gradient partition twice (its
  buffer and the flattened fp32 copy stepped), which the CPU runs show.
- LoRA/QLoRA: only trainable (adapter) parameters get grads, a master copy and moments; the frozen base
  is held in the model dtype (ZeRO-3 partitions it too). QLoRA stores the base's decoder linear weights NF4
  with double quantisation: 4 bits + 8-bit absmax per 64 + fp32 absmax per 256 blocks = 4.127 bits/param.
- offload_optimizer puts the master copy, the moments and the fp32 gradients on the CPU (the device keeps
  no gradient partition: reduced buckets are copied out); offload_params
  (ZeRO-3) the parameter partitions, leaving the gathered working set on the device.

Against measured CPU runs (fp32, 2 ranks, bench/RESULTS.md "ZeRO per-rank memory"), params + grads +
optimizer: ZeRO-0 -0.2% (tiny, the table rounds) / 0.0% (llama-h512-l8), ZeRO-2 -7.0% / -1.4%, ZeRO-3
+2.6% / +0.4%;
the ZeRO-2 gap is a flattened copy of one parameter group at the step, which weighs more on a small model.

Activations follow Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer
Models", eq. 2, no tensor/sequence parallelism): per layer ``s*b*h*(34 + 5*a*s/h)`` bytes in 16-bit, of which
``5*a*s/h`` is the attention score matrix that sdpa/flash kernels never store. fp32 doubles it. With
activation checkpointing, each layer keeps its 16-bit input (``2*s*b*h``) and one layer is live in full.
The formula is for a GPT block with a 4h MLP and dropout. Against the tensors autograd saves in a Llama
forward (hidden 512, 8 layers, SwiGLU 1408, fp32, 2 x 256 tokens; ``bench/plan_check.py``) it is -16% with
sdpa and +7% with eager attention; checkpointed layer inputs -20% (8.0 vs 10.0 MiB).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

from sftdist.config import ConfigError, PeftConfig

GIB = 2**30
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
NF4_BYTES = 4.127 / 8  # NF4 with double quantisation (bitsandbytes), per parameter


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs to know of a model.

    Attributes:
        params: All parameters (a tied embedding/head counted once).
        trainable: Parameters that get gradients: ``params`` for full fine-tuning, the adapter for LoRA.
        quantized: Frozen parameters stored 4-bit under QLoRA (the decoder's linear weights).
        largest_module: Parameters of the largest single module (ZeRO-3 gathers one at a time).
        layers, hidden, heads, vocab: ``num_hidden_layers``, ``hidden_size``, ``num_attention_heads``,
            ``vocab_size``.
    """

    params: int
    trainable: int
    quantized: int
    largest_module: int
    layers: int
    hidden: int
    heads: int
    vocab: int


@dataclass(frozen=True)
class Setup:
    """How the model is trained: ZeRO stage, ranks, dtype, PEFT method and offload."""

    zero_stage: int
    world: int
    precision: str  # fp32 | bf16 | fp16 (resolved)
    peft: str = "none"  # none | lora | qlora
    offload_optimizer: bool = False
    offload_params: bool = False
    grad_accum_fp32: bool = True  # bf16 + ZeRO 1-3 under grad_accum_dtype=auto


def model_states(shape: ModelShape, setup: Setup) -> dict[str, tuple[float, float]]:
    """Bytes of parameters, gradients and optimizer states on one rank, as ``(device, cpu)`` pairs.

    Example (1,000 parameters, full fine-tuning, bf16, ZeRO-2 on 4 ranks: 2 + 6/4 + 12/4 bytes each;
    fp32 ZeRO-0: 4 + 4 + 8):
        >>> s = ModelShape(params=1000, trainable=1000, quantized=0, largest_module=100, layers=1, hidden=8,
        ...                heads=2, vocab=10)
        >>> model_states(s, Setup(zero_stage=2, world=4, precision="bf16"))
        {'params': (2000.0, 0.0), 'grads': (1500.0, 0.0), 'optimizer': (3000.0, 0.0)}
        >>> model_states(s, Setup(zero_stage=0, world=4, precision="fp32"))
        {'params': (4000.0, 0.0), 'grads': (4000.0, 0.0), 'optimizer': (8000.0, 0.0)}

    Args:
        shape: Parameter counts (``trainable`` decides what gets gradients and optimizer states).
        setup: ZeRO stage, ranks, resolved precision, PEFT method and offload.

    Returns:
        ``{"params", "grads", "optimizer"}`` -> ``(device bytes, cpu bytes)`` of one rank; ``params`` includes
        ZeRO-3's gathered largest module on the device.
    """
    n, stage, mixed = setup.world, setup.zero_stage, setup.precision != "fp32"
    pb = BYTES[setup.precision]
    frozen = shape.params - shape.trainable
    quantized = shape.quantized if setup.peft == "qlora" else 0
    shard = (lambda x: x / n) if stage >= 1 else (lambda x: x)
    # parameters: frozen base (NF4 for QLoRA's linear weights) + trainable, in the model dtype
    params = (frozen - quantized) * pb + quantized * NF4_BYTES + shape.trainable * pb
    params = params / n if stage == 3 else params
    gathered = 4 * shape.largest_module if stage == 3 else 0  # DeepSpeed's figure for the live gathered layer
    t = shape.trainable
    if mixed:
        low = t * pb / (n if stage >= 2 else 1)  # model-dtype gradients
        full_fp32 = (stage == 1 and setup.precision == "bf16" and setup.grad_accum_fp32
                     and not setup.offload_optimizer)
        fp32 = t * 4 if stage == 0 or full_fp32 else t * 4 / n
        master = shard(t * 4.0)
    else:
        low = 0.0
        fp32 = t * 4 * (2 if stage == 3 else 1) / (n if stage >= 2 else 1)
        master = t * 4 / n if stage >= 1 else 0.0
    moments = shard(t * 8.0)
    opt_cpu = setup.offload_optimizer
    if opt_cpu:  # ZeRO-Offload streams reduced gradients from the buckets into the CPU's fp32 partition
        low = 0.0
    dev_params, cpu_params = (gathered, params) if setup.offload_params else (params + gathered, 0.0)
    return {"params": (float(dev_params), float(cpu_params)),
            "grads": (float(low + (0 if opt_cpu else fp32)), float(fp32 if opt_cpu else 0)),
            "optimizer": (0.0, master + moments) if opt_cpu else (master + moments, 0.0)}


def activation_bytes(shape: ModelShape, *, micro_batch: int, seq: int, precision: str, fused_attention: bool,
                     checkpointing: bool) -> float:
    """Activations kept for backward over one micro-batch (Korthikanti et al. 2022, see module docstring).

    Example (2 layers, h=8, a=2, s=4, b=1, bf16): one layer is 4*8*(34 + 5*2*4/8) = 1248 bytes, 1088
    without the score matrix; checkpointed: 2 * 2*4*8 inputs + one layer.
        >>> s = ModelShape(params=0, trainable=0, quantized=0, largest_module=0, layers=2, hidden=8, heads=2,
        ...                vocab=10)
        >>> [activation_bytes(s, micro_batch=1, seq=4, precision="bf16", fused_attention=f, checkpointing=c)
        ...  for f, c in ((False, False), (True, False), (True, True))]
        [2496.0, 2176.0, 1216.0]

    Args:
        shape: ``layers``, ``hidden`` and ``heads`` are used.
        micro_batch: Sequences per micro-batch (b).
        seq: Tokens per sequence, ``train.max_length`` (s).
        precision: Activation dtype: ``fp32`` doubles the 16-bit figure.
        fused_attention: sdpa/flash attention, which never stores the ``a*s^2`` score matrix.
        checkpointing: ``parallelism.activation_checkpointing``.

    Returns:
        Bytes on the device during the backward pass of one micro-batch.
    """
    s, b, h, a = seq, micro_batch, shape.hidden, shape.heads
    scale = BYTES[precision] / 2
    per_layer = s * b * h * (34 + (0 if fused_attention else 5 * a * s / h)) * scale
    if checkpointing:
        return float(shape.layers * 2 * s * b * h * scale + per_layer)
    return float(shape.layers * per_layer)


def logits_bytes(shape: ModelShape, *, micro_batch: int, seq: int, precision: str, lm_head: str,
                 chunk_tokens: int, partitioned_head: bool = False) -> float:
    """The LM head's logits and loss buffer of one micro-batch.

    Assumes every position is supervised (the worst case). ``lm_head=supervised`` (sftdist/engine/forward.py)
    gathers the supervised hidden rows and keeps one chunk of at most ``chunk_tokens`` rows of fp32 logits,
    whose storage the cross-entropy's backward reuses for their gradient; ``full`` keeps all logits in the
    model dtype plus their fp32 copy.

    Example (b=2, s=4, vocab 10, hidden 8, fp32): 8 rows of 10 fp32 logits + 8 hidden rows; chunk of 4.
        >>> s = ModelShape(params=0, trainable=0, quantized=0, largest_module=0, layers=1, hidden=8, heads=2,
        ...                vocab=10)
        >>> [logits_bytes(s, micro_batch=2, seq=4, precision="fp32", lm_head="supervised", chunk_tokens=c)
        ...  for c in (8192, 4)]
        [576.0, 416.0]

    Args:
        shape: ``vocab`` and ``hidden`` are used.
        micro_batch, seq: The micro-batch's sequences and tokens per sequence.
        precision: The model dtype (the hidden rows; logits are fp32 for the loss).
        lm_head: ``train.lm_head``.
        chunk_tokens: ``train.loss_chunk_tokens``.
        partitioned_head: ZeRO-3: the head's weight is partitioned, and training computes the whole
            micro-batch's supervised logits in one chunk (``engine/forward.py``: every chunk would gather
            the weight collectively, and ranks with different supervised counts would fall out of step).

    Returns:
        Bytes of the logits and loss buffers of one micro-batch.
    """
    tokens = micro_batch * seq
    if lm_head == "full":
        return float(tokens * shape.vocab * (BYTES[precision] + 4))
    rows = tokens if partitioned_head else min(tokens, chunk_tokens)
    return float(rows * shape.vocab * 4 + tokens * shape.hidden * BYTES[precision])


def bucket_bytes(*, zero_stage: int, precision: str, reduce_bucket: int, overlap_comm: bool,
                 contiguous_gradients: bool) -> float:
    """DeepSpeed's gradient-reduction buckets, in the model dtype (DeepSpeed 0.19.8).

    ZeRO 1-2 allocate one bucket of ``reduce_bucket_size`` elements during backward, two with
    ``overlap_comm`` (``stage_1_and_2.py``: ``buf_0``, ``buf_1``); ZeRO-3 one at initialisation
    (``stage3.py``; the CPU runs measure exactly 2e8 x 4 bytes). ``allgather_bucket_size`` allocates
    nothing: it only cuts the stage-1/2 parameter all-gather into shards (``all_gather_dp_groups``).
    Without ``contiguous_gradients`` there is no bucket.

    Example (100-element buckets, bf16):
        >>> [bucket_bytes(zero_stage=z, precision="bf16", reduce_bucket=100, overlap_comm=True,
        ...               contiguous_gradients=True) for z in (0, 2, 3)]
        [0.0, 400.0, 200.0]

    Args:
        zero_stage, precision: The run's ZeRO stage and model dtype.
        reduce_bucket: ``parallelism.reduce_bucket_size`` (elements).
        overlap_comm, contiguous_gradients: The ``parallelism`` flags of those names.

    Returns:
        Bytes of the buckets on one rank's device.
    """
    if zero_stage == 0 or not contiguous_gradients:
        return 0.0
    buffers = 2 if overlap_comm and zero_stage in (1, 2) else 1
    return float(BYTES[precision] * reduce_bucket * buffers)


def largest_fitting(fits: Callable[[int], bool], limit: int = 4096) -> int:
    """The largest ``m`` in 1..limit with ``fits(m)``, for ``fits`` true up to some point and false after
    (0 if even 1 does not fit).

    Example:
        >>> largest_fitting(lambda m: m * 3 <= 100), largest_fitting(lambda m: False)
        (33, 0)

    Args:
        fits: Whether a micro-batch of that size fits; called O(log limit) times.
        limit: The largest size tried.

    Returns:
        The largest size that fits, at most ``limit``.
    """
    if not fits(1):
        return 0
    low, high = 1, 2
    while high <= limit and fits(high):
        low, high = high, high * 2
    high = min(high, limit + 1)
    while high - low > 1:  # fits(low) and (high > limit or not fits(high))
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low


def deepspeed_model_states(shape: ModelShape, setup: Setup) -> tuple[float, float] | None:
    """DeepSpeed's own estimate of one rank's model-state bytes, ``(device, cpu)``, or None where it has none.

    DeepSpeed's estimators assume bf16/fp16 mixed precision and full fine-tuning: stage 1 is estimated as
    stage 2 (DeepSpeed has no stage-1 estimator), stage 0 has none. Its CPU figure includes a 1.5 buffer
    factor and, without offload, the memory that initialising the model takes. Where ours differ:
    fp32 training (DeepSpeed counts 16-bit states), LoRA/QLoRA (it counts every parameter as trainable),
    ZeRO-1 (partitions gradients as in stage 2; bf16 ZeRO-1 keeps full fp32 grads), and ZeRO-3, where its
    18/N omits the 16-bit parameter partition itself (2/N; ours is 2/N higher).

    Args:
        shape: ``params`` and ``largest_module`` are used.
        setup: ZeRO stage, ranks (as GPUs of one node) and offload.

    Returns:
        ``(device bytes, cpu bytes)`` from DeepSpeed (the cpu figure is for the whole node), or None for
        ZeRO-0.
    """
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    if setup.zero_stage == 0:
        return None
    if setup.zero_stage == 3:
        cpu, dev = estimate_zero3_model_states_mem_needs(
            shape.params, shape.largest_module, num_gpus_per_node=setup.world,
            cpu_offload=setup.offload_optimizer, cpu_offload_params=setup.offload_params, zero_init=True)[:2]
    else:
        cpu, dev = estimate_zero2_model_states_mem_needs(shape.params, num_gpus_per_node=setup.world,
                                                         cpu_offload=setup.offload_optimizer)
    return float(dev), float(cpu)


def hf_config(model_cfg):
    """The model's transformers config: from ``model.from_config`` (vocabulary sized to the tokenizer as
    training does, unless ``from_config.vocab_size`` is set), a local directory's config.json, or a hub id's
    config.json from the local Hugging Face cache (never downloaded here).

    Args:
        model_cfg: The ``model`` group.

    Returns:
        A transformers ``PretrainedConfig``.

    Raises:
        ConfigError: a missing local directory, an unreadable config.json, or a hub id not in the cache.
    """
    from transformers import AutoConfig

    from sftdist.engine.model import check_local_path, load_tokenizer, looks_local

    if model_cfg.from_config:
        kwargs = dict(model_cfg.from_config)
        model_type = kwargs.pop("model_type")
        if not kwargs.get("vocab_size"):
            kwargs["vocab_size"] = len(load_tokenizer(model_cfg))
        return AutoConfig.for_model(model_type, **kwargs)
    name = model_cfg.name_or_path
    check_local_path("model.name_or_path", name)
    try:
        return AutoConfig.from_pretrained(name, revision=model_cfg.revision, local_files_only=True,
                                          trust_remote_code=model_cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        if looks_local(name):
            raise ConfigError(f"model.name_or_path={name}: cannot read its config.json: "
                              f"{str(e).splitlines()[0]}") from e
        raise ConfigError(f"model.name_or_path={name}: its config.json is not in the local Hugging Face "
                          f"cache (sftdist-plan reads only the config, offline: `hf download {name} "
                          f"config.json` fetches it, or describe the model with model.from_config)") from None


def model_shape(config, peft: PeftConfig) -> ModelShape:
    """Count parameters on a model instantiated on the meta device (no memory, no weights), and the LoRA
    adapter's exactly by applying peft's LoraConfig to it.

    Args:
        config: The model's transformers config (``hf_config``).
        peft: The ``peft`` group; QLoRA counts as LoRA here, its 4-bit storage is ``memory_plan``'s business.

    Returns:
        The counts and shapes ``memory_plan`` needs.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from sftdist.engine.adapter import apply_peft

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    head = model.get_output_embeddings()
    params = sum(p.numel() for p in model.parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    # bitsandbytes quantises the decoder's linear layers and leaves the LM head in the compute dtype
    quantized = sum(m.weight.numel() for m in model.modules()
                    if isinstance(m, torch.nn.Linear) and m is not head)
    trainable = params
    if peft.method != "none":
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # transformers' is_gradient_checkpointing rename
            # QLoRA's adapters have the shapes of LoRA's on the unquantised model
            lora = apply_peft(model, PeftConfig(**{**vars(peft), "method": "lora"}))
        trainable = sum(p.numel() for p in lora.parameters() if p.requires_grad)
        params = sum(p.numel() for p in lora.parameters())
    text = getattr(config, "text_config", None) or config
    return ModelShape(params=params, trainable=trainable, quantized=quantized, largest_module=largest,
                      layers=text.num_hidden_layers, hidden=text.hidden_size, heads=text.num_attention_heads,
                      vocab=text.vocab_size)
