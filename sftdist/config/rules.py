"""The config rules that span groups (batch arithmetic, precision vs. hardware, early stopping vs. eval
data), checked once the world size and hardware are known; each error names the keys and what would work."""

from __future__ import annotations

from sftdist.config.checks import ConfigError
from sftdist.config.schema import DataConfig, SFTConfig, TrainConfig


def validate(cfg: SFTConfig, *, dp_world: int, has_gpu: bool) -> None:
    """Check the rules that span config groups.

    Args:
        cfg: The composed, typed config.
        dp_world: Number of data-parallel processes the run will use.
        has_gpu: Whether the run will train on CUDA devices.

    Raises:
        ConfigError: naming the keys that cannot work together.
    """
    if cfg.model.name_or_path is None and not cfg.model.from_config:
        raise ConfigError("model: set model.name_or_path (hub id or local directory) or model.from_config")
    if not cfg.data.sources:
        raise ConfigError("data.sources is empty: name at least one data set")
    t = cfg.train
    if t.global_batch_size % (t.micro_batch_size * dp_world):
        raise ConfigError(batch_size_message(t.global_batch_size, t.micro_batch_size, dp_world))
    if not has_gpu and cfg.parallelism.precision in ("bf16", "fp16"):
        raise ConfigError(f"parallelism.precision={cfg.parallelism.precision} needs a GPU; "
                          f"use precision=auto or fp32 on CPU")
    if not has_gpu and cfg.peft.method == "qlora":
        raise ConfigError("peft.method=qlora quantises the base model with bitsandbytes, which needs a CUDA GPU; "
                          "use peft=lora on CPU")
    if cfg.peft.method == "qlora" and cfg.model.from_config:
        raise ConfigError("peft.method=qlora needs a pretrained model (model.name_or_path) to quantise")
    if not has_gpu and cfg.model.attn_implementation.startswith("flash_attention"):
        raise ConfigError(f"model.attn_implementation={cfg.model.attn_implementation} needs a GPU; "
                          f"use sdpa or eager on CPU")
    streaming = [s.name for s in cfg.data.sources if s.streaming]
    if streaming and t.max_steps <= 0:
        raise ConfigError(f"data sources {streaming} stream, so an epoch's length is not known ahead: set "
                          f"train.max_steps")
    validate_early_stopping(t, cfg.data)


def validate_early_stopping(t: TrainConfig, data: DataConfig) -> None:
    """The metric must be one an eval pass produces, and there must be evals during the run to compare."""
    early = t.early_stopping
    if not early.patience:
        return
    with_eval = [s.name for s in data.sources if s.eval_fraction > 0 or s.eval_path]
    if not with_eval:
        raise ConfigError("train.early_stopping.patience needs eval data: give a source data.sources[].eval_fraction "
                          "or eval_path")
    if not t.eval_every:
        raise ConfigError("train.early_stopping.patience needs train.eval_every > 0 (evals during the run)")
    if early.metric.startswith("eval_loss_delta/") and not t.eval_at_start:
        raise ConfigError(f"train.early_stopping.metric={early.metric!r} is a change since the step-0 eval: it "
                          f"needs train.eval_at_start=true")
    source = early.metric.partition("/")[2]
    if source and source not in with_eval:
        raise ConfigError(f"train.early_stopping.metric={early.metric!r}: no source named {source!r} has an eval "
                          f"split (sources with one: {with_eval})")


def batch_size_message(global_batch: int, micro_batch: int, dp_world: int) -> str:
    """Why ``global_batch`` cannot be split into micro-batches on ``dp_world`` ranks, with the nearest values
    that can.

    Example:
        >>> print(batch_size_message(10, 4, 1))
        train.global_batch_size=10 is not a multiple of train.micro_batch_size=4 x 1 data-parallel process(es) = 4, so gradient accumulation would not be a whole number: use train.global_batch_size=8 or 12, or train.micro_batch_size=1, 2, 5 or 10
    """
    per_step = micro_batch * dp_world
    lower, upper = global_batch // per_step * per_step, (global_batch // per_step + 1) * per_step
    sizes = " or ".join(str(v) for v in (lower, upper) if v > 0)
    micro = [m for m in range(1, global_batch // dp_world + 1) if global_batch % (m * dp_world) == 0]
    micro_text = (f", or train.micro_batch_size={', '.join(map(str, micro[:-1]))} or {micro[-1]}" if len(micro) > 1
                  else f", or train.micro_batch_size={micro[0]}" if micro else "")
    return (f"train.global_batch_size={global_batch} is not a multiple of train.micro_batch_size={micro_batch} x "
            f"{dp_world} data-parallel process(es) = {per_step}, so gradient accumulation would not be a whole "
            f"number: use train.global_batch_size={sizes}{micro_text}")
