"""The thin layer around DeepSpeed: precision, the pure ``build_ds_config``, ZeRO-3 init, the engine and the
gradient facts the loop needs from it (ZeRO-0's grad norm, ZeRO-3's sequence-parallel gradient factor)."""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import torch

from sftdist.config import ParallelConfig, TrainConfig, grad_accum_steps


def stage0_grad_norm(engine) -> float:
    """Global L2 norm of the averaged gradients, for ZeRO-0, whose engine clips without keeping the norm.

    Call after the backward of the last micro-batch of a step (gradients are all-reduced there) and
    before ``engine.step()`` (which zeroes them).
    """
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))) if grads else 0.0


def sequence_parallel_gradient_factor(engine) -> float:
    """What the loss must be multiplied by, beyond ``loss.backward_scale``, for DeepSpeed to apply the true
    gradient under sequence parallelism: 1, except where ZeRO-3 reduce-scatters.

    DeepSpeed divides the summed gradients by the data-parallel ranks (world / SP) on every path but one:
    ZeRO-3's reduce-scatter (``stage3.__avg_scatter_grads``, DeepSpeed 0.17-0.19) divides by all ranks,
    ignoring ``sequence_parallel_size``, so its gradients (and grad norm) come out 1/SP too small. Adam
    hides most of that, clipping and the logged grad norm do not. The factor holds only while that function
    does not know about SP (read from its source), so a DeepSpeed that fixes it gets 1 again.
    """
    sp = getattr(engine, "sequence_parallel_size", 1)
    if sp == 1 or engine.zero_optimization_stage() != 3 or not getattr(engine.optimizer, "reduce_scatter", False):
        return 1.0
    return float(sp) if _zero3_scatter_ignores_sp() else 1.0


@functools.cache
def _zero3_scatter_ignores_sp() -> bool:
    import inspect

    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    scatter = getattr(DeepSpeedZeroOptimizer_Stage3, "_DeepSpeedZeroOptimizer_Stage3__avg_scatter_grads", None)
    return scatter is not None and "sequence_parallel_size" not in inspect.getsource(scatter)


def resolve_precision(precision: str, *, gpu: bool) -> str:
    """``auto`` -> bf16 on GPUs that support it, fp32 elsewhere; other values pass through."""
    if precision != "auto":
        return precision
    return "bf16" if gpu and torch.cuda.is_bf16_supported() else "fp32"


def build_ds_config(parallel: ParallelConfig, train: TrainConfig, *, dp_world: int, precision: str,
                    gpu: bool) -> dict:
    """The complete DeepSpeed config for a run, with no ``"auto"`` left in it.

    Pure: the same typed configs give the same dict, so it is unit-tested against expected dicts.

    Args:
        parallel: ZeRO stage, offload and communication options.
        train: Batch sizes, optimizer hyper-parameters and clipping.
        dp_world: Number of data-parallel processes.
        precision: ``fp32``, ``bf16`` or ``fp16`` (already resolved).
        gpu: Whether the run uses CUDA (pinned memory only makes sense there).

    Returns:
        A dict for ``deepspeed.initialize(config=...)``.
    """
    if train.lr is None:  # a TrainConfig made on its own: only SFTConfig knows what is trained
        raise ValueError("train.lr is unresolved: SFTConfig resolves train.lr=null (schema.default_lr), or set it")
    zero: dict[str, Any] = {"stage": parallel.zero_stage}
    if parallel.zero_stage > 0:
        zero.update(overlap_comm=parallel.overlap_comm, contiguous_gradients=parallel.contiguous_gradients,
                    reduce_bucket_size=parallel.reduce_bucket_size)
    if parallel.zero_stage in (1, 2):
        zero.update(allgather_bucket_size=parallel.allgather_bucket_size, reduce_scatter=True)
    if parallel.zero_stage == 3:
        zero.update(stage3_prefetch_bucket_size=50_000_000,
                    stage3_param_persistence_threshold=100_000, stage3_max_live_parameters=1_000_000_000,
                    stage3_gather_16bit_weights_on_model_save=True)
    offload_device = "nvme" if parallel.nvme_path else "cpu"
    for enabled, key in ((parallel.offload_optimizer, "offload_optimizer"), (parallel.offload_params, "offload_param")):
        if enabled:
            zero[key] = {"device": offload_device, "pin_memory": gpu}
            if parallel.nvme_path:
                zero[key]["nvme_path"] = parallel.nvme_path
    config = {
        "train_batch_size": train.global_batch_size,
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": grad_accum_steps(train, dp_world),
        "gradient_clipping": train.grad_clip,
        "optimizer": {"type": "AdamW", "params": {"lr": train.lr, "betas": list(train.adam_betas),
                                                   "eps": train.adam_eps, "weight_decay": train.weight_decay}},
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16,
                 "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,  # sftdist logs itself; silence DeepSpeed's own step printing
        "wall_clock_breakdown": False,
    }
    accum = grad_accum_dtype(parallel, precision)
    if accum is not None:
        config["data_types"] = {"grad_accum_dtype": accum}
    return config


def grad_accum_dtype(parallel: ParallelConfig, precision: str) -> Optional[str]:
    """The dtype DeepSpeed sums micro-batch gradients in, for its ``data_types.grad_accum_dtype``.

    Left to DeepSpeed (None) unless training in bf16. There ``auto`` means fp32 for ZeRO 1-3: summing 16-64
    micro-batch gradients of about 1/GA each in bf16 (8 mantissa bits) drops their low-order bits. ZeRO-0's
    engine supports only the model dtype, so it stays bf16 there.

    Example:
        >>> grad_accum_dtype(ParallelConfig(zero_stage=2), "bf16"), grad_accum_dtype(ParallelConfig(zero_stage=0), "bf16")
        ('fp32', None)
    """
    if precision != "bf16":
        return None
    if parallel.grad_accum_dtype == "auto":
        return "fp32" if parallel.zero_stage > 0 else None
    return parallel.grad_accum_dtype


def zero3_init_context(ds_config: dict) -> Optional[object]:
    """For ZeRO-3, an ``HfDeepSpeedConfig`` that makes transformers build or load the model already
    partitioned (``deepspeed.zero.Init``). The caller must keep the returned object alive while the model
    is built; ``None`` for other stages."""
    if ds_config["zero_optimization"]["stage"] != 3:
        return None
    from transformers.integrations import HfDeepSpeedConfig

    return HfDeepSpeedConfig(ds_config)


def wrap_with_deepspeed(model: torch.nn.Module, param_groups: list[dict], ds_config: dict,
                        lr_lambda: Callable[[int], float], *, mpu=None):
    """Create the DeepSpeed engine with the optimizer from ``ds_config`` and a LambdaLR schedule; ``mpu``:
    the sequence-parallel groups (``sequence_parallel.mpu()``), over which ZeRO shards and reduces.

    Returns:
        The ``DeepSpeedEngine``; DeepSpeed steps the scheduler once per optimizer step.
    """
    import deepspeed

    def scheduler(optimizer):
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)

    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=param_groups, config=ds_config,
                                           lr_scheduler=scheduler, mpu=mpu)
    _exclude_tied_frozen_weights(engine)
    return engine


def _exclude_tied_frozen_weights(engine) -> None:
    """Make ``save_checkpoint(exclude_frozen_parameters=True)`` also drop tied aliases of frozen weights.

    DeepSpeed drops the names ``named_parameters()`` yields, which lists a tied weight once: with LoRA on a
    model with tied embeddings, ``lm_head.weight`` (vocab x hidden, ~15% of a 1B model) stayed in every
    checkpoint. The aliases are rebuilt from the base model like every other frozen weight.
    """
    frozen = [n for n, p in engine.module.named_parameters(remove_duplicate=False) if not p.requires_grad]
    if not frozen:
        return
    original = engine.module_state_dict

    def module_state_dict(*args, exclude_frozen_parameters=False, **kwargs):
        state = original(*args, exclude_frozen_parameters=exclude_frozen_parameters, **kwargs)
        if exclude_frozen_parameters:
            for name in frozen:
                state.pop(name, None)
        return state

    engine.module_state_dict = module_state_dict
