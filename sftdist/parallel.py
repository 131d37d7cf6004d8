"""The thin layer over torch.distributed and DeepSpeed: process group, rank helpers, the pure DeepSpeed
config builder and the engine wrapper. DeepSpeed is imported only inside functions that need it."""

from __future__ import annotations

import os
import sys
from datetime import timedelta
from typing import Any, Callable, Optional, TypeVar

import torch
import torch.distributed as dist

from sftdist.build_locks import use_env_extensions_dir
from sftdist.config import ParallelConfig, TrainConfig, grad_accum_steps
from sftdist.hostinfo import free_port


def has_gpu() -> bool:
    """Whether this process will train on a CUDA device."""
    return torch.cuda.is_available()


def init_distributed(*, timeout_s: float = 1800.0) -> None:
    """Join the process group that the launcher set up, or make a one-process group without a launcher.

    ``python -m sftdist.train`` runs without torchrun; DeepSpeed still needs a process group, and without
    the launcher's variables it would go looking for MPI. DeepSpeed's ops are built in this environment's
    own directory (``build_locks.use_env_extensions_dir``).

    A collective that waits ``timeout_s`` for a peer fails, so a rank that died or hung ends the job instead
    of stalling the others forever. gloo raises at once when a peer's connection closes, and after
    ``timeout_s`` when a peer is alive but silent. NCCL aborts a timed-out collective from its watchdog
    thread only with async error handling on (``TORCH_NCCL_ASYNC_ERROR_HANDLING``, set to 1 here unless the
    user set it; torch >= 2.2 defaults to 3, also on), otherwise its ranks would wait in the kernel forever.

    Args:
        timeout_s: Seconds before a collective without an answer fails (``parallelism.collective_timeout_s``).
            It also becomes the default of the groups made later without a timeout of their own: DeepSpeed
            runs its gradient reductions on such a group (a clone of the world), which would otherwise get
            torch's default (30 min for gloo, 10 min for NCCL). ``_slow_group`` keeps its day.
    """
    if dist.is_initialized():
        return
    if "RANK" not in os.environ:
        os.environ.update(slurm_rank_env(os.environ) or dict(
            RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(free_port())))
    if has_gpu():
        torch.cuda.set_device(local_rank())
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")  # read when the NCCL group is made
    use_env_extensions_dir()  # before DeepSpeed loads its first op (the shm all-reduce, just below)
    import deepspeed
    from torch.distributed import distributed_c10d

    timeout = timedelta(seconds=timeout_s)
    # torch has no public setter for the default of later groups; new_group reads these module values.
    distributed_c10d.default_pg_timeout = distributed_c10d.default_pg_nccl_timeout = timeout
    deepspeed.init_distributed(dist_backend="nccl" if has_gpu() else "gloo", timeout=timeout)


def slurm_rank_env(env) -> Optional[dict[str, str]]:
    """The process-group variables of a rank that ``srun`` started (sbatch jobs, submitit), from SLURM's own:
    rank = ``SLURM_PROCID``, world = the step's tasks; the others are met at the job's first node on a port
    derived from the job id, unless ``MASTER_ADDR``/``MASTER_PORT`` are set. None outside a multi-task step.

    Example:
        >>> slurm_rank_env({"SLURM_PROCID": "3", "SLURM_STEP_NUM_TASKS": "4", "SLURM_LOCALID": "1",
        ...                 "SLURM_STEP_TASKS_PER_NODE": "2(x2)", "SLURM_JOB_ID": "1234", "MASTER_ADDR": "n1"})
        {'RANK': '3', 'WORLD_SIZE': '4', 'LOCAL_RANK': '1', 'LOCAL_WORLD_SIZE': '2', 'MASTER_ADDR': 'n1', 'MASTER_PORT': '21234'}
    """
    world = int(env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or 1)
    if "SLURM_PROCID" not in env or world <= 1:
        return None
    per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or "1"
    addr = env.get("MASTER_ADDR") or _first_host(env["SLURM_JOB_NODELIST"])
    return {"RANK": env["SLURM_PROCID"], "WORLD_SIZE": str(world), "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
            "LOCAL_WORLD_SIZE": per_node.split("(")[0].split(",")[0], "MASTER_ADDR": addr,
            "MASTER_PORT": env.get("MASTER_PORT") or str(20000 + int(env["SLURM_JOB_ID"]) % 40000)}


def lost_peer(error: BaseException, *, timeout_s: float) -> Optional[str]:
    """What a collective's failure says about the other ranks, or None for any other error.

    gloo raises a plain ``RuntimeError`` whose message names its transport file, so the message is all there
    is to tell a lost peer from a bug. The survivor says it in one line; which rank died first is in the
    launcher's report (torchrun's "Root Cause", SLURM's task exit).

    Example:
        >>> lost_peer(RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer"), timeout_s=9)
        'a peer rank is gone (its connection closed: it died, or was killed)'
        >>> lost_peer(RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:81] Timed out"), timeout_s=9)
        'no answer from a peer rank for 9 s (parallelism.collective_timeout_s): it hung, or is far behind'
        >>> lost_peer(RuntimeError("shape mismatch"), timeout_s=9) is None
        True
    """
    text = str(error)
    if not isinstance(error, dist.DistError) and "gloo/transport" not in text:
        return None
    if "Timed out" in text or "timed out" in text:
        return (f"no answer from a peer rank for {timeout_s:g} s (parallelism.collective_timeout_s): it "
                f"hung, or is far behind")
    return "a peer rank is gone (its connection closed: it died, or was killed)"


def report_lost_peer(error: BaseException, *, timeout_s: float) -> None:
    """Say on stderr, on every rank (the first to notice may not be rank 0), when ``error`` is a collective
    that failed for a lost peer; the caller re-raises it."""
    if why := lost_peer(error, timeout_s=timeout_s):
        print(f"sftdist rank {rank()}: error: a collective failed, {why}; this rank stops too (the "
              f"launcher's report or the other ranks' logs name the rank that failed first)", file=sys.stderr,
              flush=True)


def _first_host(nodelist: str) -> str:
    import subprocess

    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
    return out.stdout.split()[0]


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", 1))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main() -> bool:
    """True on global rank 0, the only rank that writes files and logs."""
    return rank() == 0


def device() -> torch.device:
    return torch.device("cuda", local_rank()) if has_gpu() else torch.device("cpu")


def all_reduce_sum(values: list[float]) -> list[float]:
    """Sum a few numbers over all ranks (one collective; every rank must call it)."""
    t = torch.tensor(values, dtype=torch.float64, device=device())
    if dist.is_initialized() and world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


def broadcast_from_main(obj: Any) -> Any:
    """Rank 0's value of ``obj`` on every rank."""
    if not dist.is_initialized() or world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


T = TypeVar("T")
_SLOW_GROUP = None


def _slow_group():
    """A gloo group whose collectives wait up to a day: for ranks waiting on long work of another rank
    (tokenisation, checkpoint conversion), which must not trip the training process group's timeouts."""
    global _SLOW_GROUP
    if _SLOW_GROUP is None:
        _SLOW_GROUP = dist.new_group(backend="gloo", timeout=timedelta(days=1))
    return _SLOW_GROUP


def _run_on(selected: bool, fn: Callable[[], T]) -> Optional[T]:
    """Run ``fn`` where ``selected``; every rank waits, and raises the first error any rank hit."""
    error: Optional[BaseException] = None
    result = None
    if selected:
        try:
            result = fn()
        except Exception as e:  # re-raised below on every rank, after everyone has heard of it
            error = e
    errors: list = [None] * world_size()
    dist.all_gather_object(errors, error, group=_slow_group())
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        raise first
    return result


def local_main_first(fn: Callable[[], T]) -> T:
    """Run ``fn`` on local rank 0 of every node first, then on the other ranks (which then find its cache).

    If ``fn`` fails on a node's first rank, every rank raises the same error.
    """
    if not dist.is_initialized() or world_size() == 1:
        return fn()
    result = _run_on(local_rank() == 0, fn)
    return result if local_rank() == 0 else fn()


def main_only(fn: Callable[[], T]) -> T:
    """Run ``fn`` once, on global rank 0, while the others wait; every rank gets its result (or its error).

    For work on shared storage that must happen once for the whole job, however many nodes it spans.
    """
    if not dist.is_initialized() or world_size() == 1:
        return fn()
    return broadcast_from_main(_run_on(is_main(), fn))


def stage0_grad_norm(engine) -> float:
    """Global L2 norm of the averaged gradients, for ZeRO-0, whose engine clips without keeping the norm.

    Call after the backward of the last micro-batch of a step (gradients are all-reduced there) and
    before ``engine.step()`` (which zeroes them).
    """
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))) if grads else 0.0


def shutdown() -> None:
    """Leave the process group cleanly (an abandoned gloo group can abort the interpreter at exit)."""
    global _SLOW_GROUP
    if dist.is_initialized():
        dist.destroy_process_group()
    _SLOW_GROUP = None  # belonged to the destroyed group; a next run in this process (a sweep) makes its own


def barrier() -> None:
    if dist.is_initialized() and world_size() > 1:
        dist.barrier()


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
                        lr_lambda: Callable[[int], float]):
    """Create the DeepSpeed engine with the optimizer from ``ds_config`` and a LambdaLR schedule.

    Returns:
        The ``DeepSpeedEngine``; DeepSpeed steps the scheduler once per optimizer step.
    """
    import deepspeed

    def scheduler(optimizer):
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)

    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=param_groups, config=ds_config,
                                           lr_scheduler=scheduler)
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
