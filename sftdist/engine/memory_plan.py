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

Beside the model states a rank holds DeepSpeed's gradient-reduction buckets (``bucket_bytes``: on CPU only
their written pages), what a micro-batch keeps for backward (``sftdist.engine.activation_memory``) and the
runtime (``runtime_bytes``: on CPU the Python process's own resident set, on a GPU the CUDA context). Against
the peak RSS of CPU runs of SmolLM2-135M's shape (fp32, 2 x 512 tokens; ``bench/plan_rss.py``) the total is
within 15%: full fine-tuning ZeRO-2, LoRA ZeRO-2 and full fine-tuning ZeRO-3 on 2 ranks.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

from sftdist.config import ConfigError, PeftConfig

GIB = 2**30
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
NF4_BYTES = 4.127 / 8  # NF4 with double quantisation (bitsandbytes), per parameter
CPU_RUNTIME_BYTES = 392 * 2**20  # RSS of a rank before its model is built (runtime_bytes)
CUDA_CONTEXT_BYTES = 287_047_680  # CUDA context with lazy module loading (runtime_bytes)


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
        intermediate: ``intermediate_size`` of a gated (SwiGLU) MLP; 0 for other MLPs, whose activations
            follow Korthikanti et al.'s GPT block (``activation_memory``).
        adapter_inputs, adapter_ranks: LoRA: the input features and the ranks of every adapted linear layer,
            summed over the model; adapter_dropout: ``peft.dropout``.
        mlp_adapter_inputs, mlp_adapter_ranks: The MLP projections' share of those (a tiled MLP recomputes
            them in backward instead of keeping them).
        kv_heads, head_dim: ``num_key_value_heads`` and the head size (0: ``heads`` and ``hidden / heads``);
            sequence parallelism's all-to-all moves q, k and v at these shapes.
        tileable_mlp: The MLP is one ``parallelism.tiled_mlp`` tiles (gate_proj, up_proj, down_proj, act_fn;
            not Phi-3's fused gate_up_proj).
    """

    params: int
    trainable: int
    quantized: int
    largest_module: int
    layers: int
    hidden: int
    heads: int
    vocab: int
    intermediate: int = 0
    adapter_inputs: int = 0
    adapter_ranks: int = 0
    adapter_dropout: float = 0.0
    mlp_adapter_inputs: int = 0
    mlp_adapter_ranks: int = 0
    kv_heads: int = 0
    head_dim: int = 0
    tileable_mlp: bool = True


@dataclass(frozen=True)
class Setup:
    """How the model is trained: ZeRO stage, ranks, dtype, PEFT method, offload and sequence parallelism
    (ZeRO shards the model states over all ``world`` ranks whatever ``sequence_parallel`` is)."""

    zero_stage: int
    world: int
    precision: str  # fp32 | bf16 | fp16 (resolved)
    peft: str = "none"  # none | lora | qlora
    offload_optimizer: bool = False
    offload_params: bool = False
    grad_accum_fp32: bool = True  # bf16 + ZeRO 1-3 under grad_accum_dtype=auto
    device: str = "gpu"  # gpu | cpu: what the run trains on (runtime_bytes, bucket_bytes)
    sequence_parallel: int = 1  # ranks that split each row; data parallelism runs over world / this


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


def bucket_bytes(*, zero_stage: int, precision: str, reduce_bucket: int, overlap_comm: bool,
                 contiguous_gradients: bool, trainable: int | None = None, device: str = "gpu") -> float:
    """DeepSpeed's gradient-reduction buckets, in the model dtype (DeepSpeed 0.19.8).

    ZeRO 1-2 allocate one bucket of ``reduce_bucket_size`` elements during backward, two with
    ``overlap_comm`` (``stage_1_and_2.py``: ``buf_0``, ``buf_1``); ZeRO-3 one at initialisation
    (``stage3.py``). ``allgather_bucket_size`` allocates nothing: it only cuts the stage-1/2 parameter
    all-gather into shards (``all_gather_dp_groups``). Without ``contiguous_gradients`` there is no bucket.
    On a GPU the caching allocator reserves the whole bucket. On CPU a bucket is an untouched ``mmap`` until
    gradients are copied into it: only those pages become resident, so it holds at most the ``trainable``
    elements (every rank's buckets take all of its gradients before they are reduced to their owner); the
    CPU runs measure 2e8 x 4 bytes allocated under ZeRO-3 (``bench/zero_memory.py``) and a resident set
    that grows by the trainable elements only (``bench/plan_rss.py``).

    Example (100-element buckets, bf16; on CPU with 30 trainable elements):
        >>> [bucket_bytes(zero_stage=z, precision="bf16", reduce_bucket=100, overlap_comm=True,
        ...               contiguous_gradients=True) for z in (0, 2, 3)]
        [0.0, 400.0, 200.0]
        >>> bucket_bytes(zero_stage=2, precision="bf16", reduce_bucket=100, overlap_comm=True,
        ...              contiguous_gradients=True, trainable=30, device="cpu")
        60.0

    Args:
        zero_stage, precision: The run's ZeRO stage and model dtype.
        reduce_bucket: ``parallelism.reduce_bucket_size`` (elements).
        overlap_comm, contiguous_gradients: The ``parallelism`` flags of those names.
        trainable: Parameters that get gradients (``ModelShape.trainable``); bounds the CPU figure.
        device: ``gpu`` or ``cpu``.

    Returns:
        Bytes of the buckets on one rank's device.
    """
    if zero_stage == 0 or not contiguous_gradients:
        return 0.0
    elements = reduce_bucket * (2 if overlap_comm and zero_stage in (1, 2) else 1)
    if device == "cpu" and trainable is not None:
        elements = min(elements, trainable)
    return float(BYTES[precision] * elements)


def runtime_bytes(device: str) -> float:
    """What a training process holds on its device before the model exists.

    - ``cpu``: the resident set of the Python process with torch, DeepSpeed, transformers and datasets
      imported, the gloo process group up, the tokenizer loaded and the data stage done:
      ``CPU_RUNTIME_BYTES``, measured on this project's CPU machine (``bench/plan_rss.py``: 393 MiB with
      the GPT-2 tokenizer, 306 MiB of it before the data stage; ``bench/zero_memory.py``: 383 MiB with
      the demo tokenizer). It does not grow with the model.
    - ``gpu``: the CUDA context, which is outside torch's allocator: 287,047,680 bytes with a first tensor
      under lazy module loading, against 666,632,192 loading eagerly (measured in PyTorch PR #85692, which
      made torch set ``CUDA_MODULE_LOADING=LAZY``; CUDA's own default on Linux since 12.2). Kernels loaded
      later (cuBLAS, NCCL), NCCL's buffers and the caching allocator's fragmentation are not counted: leave
      10-15% headroom on a GPU.

    Example:
        >>> round(runtime_bytes("cpu") / 2**20), round(runtime_bytes("gpu") / 2**20)
        (392, 274)

    Args:
        device: ``cpu`` or ``gpu``.

    Returns:
        Bytes per rank.
    """
    return float(CPU_RUNTIME_BYTES if device == "cpu" else CUDA_CONTEXT_BYTES)


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
    text = getattr(config, "text_config", None) or config
    # a gated MLP (gate_proj, or Phi-3's fused gate_up_proj) is what activation_memory counts tensor by tensor
    gated = any(name.endswith(("gate_proj", "gate_up_proj")) for name, _ in model.named_modules())
    from sftdist.engine.tiling import MLP_PARTS

    tileable = any(all(hasattr(m, part) for part in MLP_PARTS) for m in model.modules())
    trainable, adapter_inputs, adapter_ranks, mlp_inputs, mlp_ranks = params, 0, 0, 0, 0
    if peft.method != "none":
        from peft.tuners.lora import LoraLayer

        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # transformers' is_gradient_checkpointing rename
            # QLoRA's adapters have the shapes of LoRA's on the unquantised model
            lora = apply_peft(model, PeftConfig(**{**vars(peft), "method": "lora"}))
        trainable = sum(p.numel() for p in lora.parameters() if p.requires_grad)
        params = sum(p.numel() for p in lora.parameters())
        adapted = [(name, m) for name, m in lora.named_modules() if isinstance(m, LoraLayer)]
        adapter_inputs = sum(m.in_features for _, m in adapted)
        adapter_ranks = sum(sum(m.r.values()) for _, m in adapted)
        mlp = [m for name, m in adapted if name.rsplit(".", 1)[-1] in MLP_PARTS]
        mlp_inputs, mlp_ranks = sum(m.in_features for m in mlp), sum(sum(m.r.values()) for m in mlp)
    return ModelShape(params=params, trainable=trainable, quantized=quantized, largest_module=largest,
                      layers=text.num_hidden_layers, hidden=text.hidden_size, heads=text.num_attention_heads,
                      vocab=text.vocab_size, intermediate=getattr(text, "intermediate_size", 0) if gated else 0,
                      adapter_inputs=adapter_inputs, adapter_ranks=adapter_ranks,
                      adapter_dropout=peft.dropout if peft.method != "none" else 0.0,
                      mlp_adapter_inputs=mlp_inputs, mlp_adapter_ranks=mlp_ranks,
                      kv_heads=getattr(text, "num_key_value_heads", None) or text.num_attention_heads,
                      head_dim=getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads,
                      tileable_mlp=tileable)
