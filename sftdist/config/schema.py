"""Typed run configuration: one dataclass per Hydra config group, plus cross-group validation.

Every group under ``conf/`` maps to exactly one dataclass here. ``SFTConfig`` is the root schema that
``conf/config.yaml`` lists first in its defaults, so Hydra rejects unknown keys and wrong types while
composing, before anything expensive runs. ``__post_init__`` checks one group; ``validate()`` checks the
rules that span groups (batch arithmetic, precision vs. hardware, offload vs. stage).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

# ConfigError, LaunchConfig and slurm_minutes are imported from here by callers (re-exported).
from sftdist.config.checks import ConfigError, check_choice, check_positive
from sftdist.config.launch import LaunchConfig

TRAIN_ON = ("assistant", "last", "all")
FORMATS = ("messages", "sharegpt", "alpaca", "prompt_completion", "text")
MIX_BY = ("samples", "tokens")
TRUNCATION = ("truncate", "drop", "error")
ON_BAD_RECORD = ("error", "skip")
DEDUP = ("none", "exact", "near")
SPLIT_TURNS = ("auto", "always", "never")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
SCHEDULES = ("cosine", "linear", "constant")
LOSSES = ("ce", "dft")
LOSS_NORMALIZATIONS = ("token", "sequence")
WANDB_MODES = ("online", "offline", "disabled")
PROGRESS = ("auto", "bar", "lines")
PEFT_METHODS = ("none", "lora", "qlora")


@dataclass
class ModelConfig:
    """The base model and its tokenizer (group ``model/``)."""

    name_or_path: Optional[str] = None  # HF hub id or local directory; None builds from ``from_config``
    tokenizer: Optional[str] = None  # tokenizer id/dir; defaults to name_or_path; "builtin:demo" = offline demo
    from_config: Optional[Dict[str, Any]] = None  # kwargs for AutoConfig.for_model (random init), e.g. tiny
    attn_implementation: str = "sdpa"  # eager | sdpa | flash_attention_2 | flash_attention_3
    trust_remote_code: bool = False
    revision: Optional[str] = None  # hub revision (branch, tag or commit)
    # a Jinja chat template (a file path, or the template text) for a tokenizer that lacks one or has the wrong one
    chat_template: Optional[str] = None

    def __post_init__(self) -> None:
        # "Neither set" is left to validate(): the schema's own default must construct.
        if self.name_or_path is not None and self.from_config:
            raise ConfigError("model: set only one of model.name_or_path and model.from_config")
        if self.from_config and "model_type" not in self.from_config:
            raise ConfigError("model.from_config needs a model_type (e.g. llama)")
        if self.from_config and self.tokenizer is None:
            raise ConfigError("model.tokenizer is required when the model is built from model.from_config")


@dataclass
class DataSource:
    """One data set in the training mix."""

    name: str = "???"  # short id used in logs and metrics (loss/<name>)
    path: str = "???"  # file or folder (.jsonl .json .parquet .csv .txt), HF hub dataset id, or builtin:NAME
    format: str = "messages"  # messages | sharegpt | alpaca | prompt_completion | text (every token trained)
    columns: Dict[str, str] = field(default_factory=dict)  # canonical field -> column, e.g. {messages: chat}
    weight: float = 1.0  # relative share of the mix, in samples or supervised tokens (data.mix_by)
    max_samples: Optional[int] = None  # use at most this many records
    split: str = "train"  # hub datasets: which split
    config: Optional[str] = None  # hub datasets: configuration name
    revision: Optional[str] = None  # hub datasets: branch, tag or commit
    eval_fraction: float = 0.0  # hold out this fraction of records (chosen by train.seed) for eval
    eval_path: Optional[str] = None  # or evaluate on this separate file
    # generic (replay) data: its eval_loss_delta/<name> is the forgetting curve; None = true for format text
    generic: Optional[bool] = None
    # Read, tokenise and pack on the fly, each rank its own share, without a cache entry: for sets larger than
    # the disk cache (docs/data.md#streaming-sources). Needs train.max_steps; eval from eval_path
    streaming: bool = False

    @property
    def is_generic(self) -> bool:
        return self.format == "text" if self.generic is None else self.generic

    def __post_init__(self) -> None:
        check_choice(f"data.sources[{self.name}].format", self.format, FORMATS)
        check_positive(f"data.sources[{self.name}].weight", self.weight, allow_zero=True)
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError(f"data.sources[{self.name}].eval_fraction={self.eval_fraction} must be in [0, 1)")
        if self.eval_fraction and self.eval_path:
            raise ConfigError(f"data.sources[{self.name}]: set eval_fraction or eval_path, not both")
        if self.streaming and self.eval_fraction:
            raise ConfigError(f"data.sources[{self.name}]: a streaming source cannot hold out eval_fraction of "
                              f"records it never holds: set its eval_path to a held-out file")


@dataclass
class DataConfig:
    """The data mix (group ``data/``)."""

    sources: List[DataSource] = field(default_factory=list)
    train_on: str = "assistant"  # assistant (every assistant turn) | last (final assistant turn) | all
    # One sample per trained assistant turn, rendered as at inference (the generation prompt of the turns before
    # it, then the reply): auto = for a conversation that the chat template renders otherwise (Qwen3 and
    # DeepSeek-R1 drop earlier or all reasoning, Mistral v0.3 drops the system prompt) | always | never
    split_turns: str = "auto"
    mix_by: str = "samples"  # weights share out samples | supervised tokens
    packing: bool = False  # pack samples into train.max_length rows (no attention across samples)
    truncation: str = "truncate"  # over-length samples: truncate | drop | error (stop, naming the record)
    on_bad_record: str = "error"  # error (stop, naming file and record) | skip (count per reason)
    audit_samples: int = 32  # records per source whose masks are audited before training (0 = off)
    num_proc: int = 0  # tokenisation processes; 0 = one per CPU this process may use (affinity), up to 8
    # a chat template with no end-of-turn token is an error (the model would never learn to stop); false allows it
    require_end_of_turn: bool = True
    cache_dir: Optional[str] = None  # tokenised-data cache; default $SFTDIST_CACHE/data
    stream_buffer: int = 1000  # with a streaming source: samples each rank holds to shuffle and pack rows from
    # Filters, counted per source like other skips (chat formats; the first occurrence is kept):
    dedup: str = "none"  # none | exact (same normalised conversation) | near (+ MinHash near-duplicate replies)
    near_dup_threshold: float = 0.8  # data.dedup=near: Jaccard similarity of reply word 3-grams
    min_reply_tokens: int = 0  # drop records with a trained reply under this many tokens (0 = off)
    drop_cut_replies: bool = False  # drop records with a reply that looks cut off (see sftdist-data quality)
    # General prompts never trained on, answered at step 0 and at every eval to measure forgetting
    # (forgetting/kl, forgetting/answer_agreement): auto (the built-in set for a pretrained model; off for one
    # built from scratch) | builtin | none | a file of prompts ({"prompt": ...} or {"messages": [...]} records)
    forgetting_probe: str = "auto"
    forgetting_probe_min_agreement: float = 0.8  # warn when a smaller share of probe answers match the base's
    forgetting_probe_max_new_tokens: int = 32  # tokens of each probe answer (greedy)

    def __post_init__(self) -> None:
        check_choice("data.train_on", self.train_on, TRAIN_ON)
        check_choice("data.split_turns", self.split_turns, SPLIT_TURNS)
        if self.split_turns == "always" and self.train_on == "all":
            raise ConfigError("data.split_turns=always needs data.train_on=assistant or last: train_on=all trains "
                              "every token of a conversation, so there is no single turn to make a sample of")
        check_choice("data.mix_by", self.mix_by, MIX_BY)
        check_choice("data.truncation", self.truncation, TRUNCATION)
        check_choice("data.on_bad_record", self.on_bad_record, ON_BAD_RECORD)
        check_positive("data.audit_samples", self.audit_samples, allow_zero=True)
        check_positive("data.num_proc", self.num_proc, allow_zero=True)
        check_positive("data.stream_buffer", self.stream_buffer)
        if self.dedup != "none" and any(s.streaming for s in self.sources):
            raise ConfigError(f"data.dedup={self.dedup} compares every record with every other, which a streaming "
                              f"source never holds: set data.dedup=none, or streaming: false")
        check_choice("data.dedup", self.dedup, DEDUP)
        if not 0.0 < self.near_dup_threshold <= 1.0:
            raise ConfigError(f"data.near_dup_threshold={self.near_dup_threshold} must be in (0, 1]")
        check_positive("data.min_reply_tokens", self.min_reply_tokens, allow_zero=True)
        if not 0.0 <= self.forgetting_probe_min_agreement <= 1.0:
            raise ConfigError(f"data.forgetting_probe_min_agreement={self.forgetting_probe_min_agreement} must be "
                              f"in [0, 1]")
        check_positive("data.forgetting_probe_max_new_tokens", self.forgetting_probe_max_new_tokens)
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ConfigError(f"data.sources: names must be unique, got {names}")
        if self.sources and sum(s.weight for s in self.sources) <= 0:
            raise ConfigError("data.sources: at least one weight must be > 0")


@dataclass
class ParallelConfig:
    """DeepSpeed ZeRO stage, precision and memory options (group ``parallelism/``)."""

    zero_stage: int = 2  # 0 = plain data parallel, 1 = optimizer states, 2 = + grads, 3 = + params
    precision: str = "auto"  # auto = bf16 on GPUs that support it, else fp32
    offload_optimizer: bool = False  # optimizer states in CPU memory (ZeRO-Offload)
    offload_params: bool = False  # parameters in CPU memory (ZeRO-3 only)
    nvme_path: Optional[str] = None  # offload to NVMe at this path instead of CPU memory
    activation_checkpointing: bool = False  # recompute activations in backward to save memory
    # With activation_checkpointing: keep each layer's saved input in pinned host memory, copied back for its
    # recompute (ALST's checkpoint offload: frees layers x tokens x hidden of device memory at long lengths)
    activation_checkpointing_offload: bool = False
    overlap_comm: bool = True  # overlap gradient reduction with backward
    contiguous_gradients: bool = True
    reduce_bucket_size: int = 200_000_000  # elements per gradient-reduction bucket
    allgather_bucket_size: int = 200_000_000  # elements per all-gather bucket (stages 1-2)
    # bf16 gradient accumulation over micro-batches: auto = fp32 where DeepSpeed supports it (ZeRO 1-3),
    # bf16 under ZeRO-0, whose engine can only accumulate in the model dtype
    grad_accum_dtype: str = "auto"  # auto | fp32 | bf16
    build_lock_stale_s: float = 900.0  # a DeepSpeed op build lock older than this, with no live builder, is removed
    # Seconds a collective may wait for a peer before it fails, so a hung or lost rank ends the job instead of
    # stalling it. Above the longest time one rank waits for another (rank 0 saving the final model, a checkpoint).
    collective_timeout_s: float = 1800.0
    # Ranks that split each sequence between them (Ulysses: each attends with 1/N of the heads over the whole
    # sequence); data parallelism runs across the groups, over world / N ranks. For sequences whose activations
    # do not fit one rank (docs/parallelism.md#sequence-parallelism)
    sequence_parallel_size: int = 1
    # Run each layer's MLP over tiles of ~hidden_size positions, recomputed tile by tile in backward (ALST): one
    # more MLP forward per step for a fraction of the MLP's activation memory. auto = when a rank's share of a
    # row (max_length / sequence_parallel_size) reaches 8192 tokens
    tiled_mlp: str = "auto"  # auto | true | false

    def __post_init__(self) -> None:
        check_positive("parallelism.sequence_parallel_size", self.sequence_parallel_size)
        if self.activation_checkpointing_offload and not self.activation_checkpointing:
            raise ConfigError("parallelism.activation_checkpointing_offload=true offloads what activation "
                              "checkpointing saves: also set parallelism.activation_checkpointing=true")
        self.tiled_mlp = str(self.tiled_mlp).lower()  # (the command line's true/false arrive as True/False)
        check_choice("parallelism.tiled_mlp", self.tiled_mlp, ("auto", "true", "false"))
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"parallelism.zero_stage={self.zero_stage} must be 0, 1, 2 or 3")
        check_choice("parallelism.precision", self.precision, PRECISIONS)
        if self.offload_params and self.zero_stage != 3:
            raise ConfigError("parallelism.offload_params needs parallelism.zero_stage=3")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ConfigError("parallelism.offload_optimizer needs parallelism.zero_stage >= 1")
        check_choice("parallelism.grad_accum_dtype", self.grad_accum_dtype, ("auto", "fp32", "bf16"))
        if self.grad_accum_dtype == "fp32" and self.zero_stage == 0:
            raise ConfigError("parallelism.grad_accum_dtype=fp32 needs parallelism.zero_stage >= 1: DeepSpeed's "
                              "ZeRO-0 engine accumulates gradients in the model dtype (use auto or bf16)")
        check_positive("parallelism.build_lock_stale_s", self.build_lock_stale_s)
        if self.nvme_path and not (self.offload_optimizer or self.offload_params):
            raise ConfigError(f"parallelism.nvme_path={self.nvme_path} names where to offload, but nothing is "
                              f"offloaded: also set parallelism.offload_optimizer=true (ZeRO >= 1) and/or "
                              f"parallelism.offload_params=true (ZeRO-3), or drop nvme_path")
        if self.precision == "fp32" and self.grad_accum_dtype == "bf16":
            raise ConfigError("parallelism.precision=fp32 conflicts with parallelism.grad_accum_dtype=bf16 (fp32 "
                              "gradients cannot be accumulated in bf16): use grad_accum_dtype=auto, or precision=bf16")
        check_positive("parallelism.collective_timeout_s", self.collective_timeout_s)


@dataclass
class PeftConfig:
    """Parameter-efficient fine-tuning (group ``peft/``)."""

    method: str = "none"  # none = full fine-tuning | lora | qlora (4-bit base, CUDA + bitsandbytes)
    r: int = 16  # LoRA rank
    alpha: int = 32  # LoRA scaling numerator (scale = alpha / r)
    dropout: float = 0.05
    target_modules: List[str] = field(default_factory=lambda: ["all-linear"])
    modules_to_save: Optional[List[str]] = None  # trained in full and saved with the adapter
    use_dora: bool = False  # weight-decomposed LoRA (DoRA)
    use_rslora: bool = False  # rank-stabilised scaling alpha / sqrt(r) instead of alpha / r
    merge_on_save: bool = False  # also write final_merged/: the base with the adapter merged in

    def __post_init__(self) -> None:
        check_choice("peft.method", self.method, PEFT_METHODS)
        if self.method != "none":
            check_positive("peft.r", self.r)
            if not self.target_modules:
                raise ConfigError("peft.target_modules is empty")


EARLY_STOPPING_SAVE = ("best", "last")


@dataclass
class EarlyStoppingConfig:
    """Stop when an eval metric stops improving (``train.early_stopping``); off while ``patience`` is 0."""

    metric: str = "eval_loss"  # eval_loss, eval_loss/<source> or eval_loss_delta/<source>; lower is better
    patience: int = 0  # evals in a row without an improvement of more than min_delta before stopping; 0 = off
    min_delta: float = 0.0  # an improvement must lower the metric by more than this
    save: str = "best"  # final/ from the best eval step (checkpointed when it improves) | the last step

    def __post_init__(self) -> None:
        check_positive("train.early_stopping.patience", self.patience, allow_zero=True)
        check_positive("train.early_stopping.min_delta", self.min_delta, allow_zero=True)
        check_choice("train.early_stopping.save", self.save, EARLY_STOPPING_SAVE)
        if not (self.metric == "eval_loss" or self.metric.startswith(("eval_loss/", "eval_loss_delta/"))):
            raise ConfigError(f"train.early_stopping.metric={self.metric!r}: use eval_loss, eval_loss/<source> "
                              f"or eval_loss_delta/<source>")


@dataclass
class TrainConfig:
    """Optimisation, batch sizes and run length (group ``train/``)."""

    max_steps: int = -1  # optimizer steps; -1 = derive from epochs
    epochs: float = 1.0  # passes over the mixed data when max_steps = -1
    # peak learning rate; null = by what is trained (default_lr): 2e-5 full fine-tuning, 2e-4 LoRA/QLoRA of a
    # pretrained model, 3e-3 for a model built from scratch (model.from_config, e.g. the demo's tiny model)
    lr: Optional[float] = None
    schedule: str = "cosine"  # cosine | linear | constant, after warmup
    warmup_steps: int = 0
    warmup_ratio: float = 0.0  # fraction of max_steps, used when warmup_steps = 0
    min_lr_ratio: float = 0.0  # final lr as a fraction of the peak
    weight_decay: float = 0.0  # not applied to biases, norms or embeddings
    adam_betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    adam_eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    micro_batch_size: int = 1  # sequences per forward/backward on one rank
    global_batch_size: int = 8  # sequences per optimizer step over all ranks
    max_length: int = 2048  # tokens per sequence (per packed row with data.packing)
    lm_head: str = "supervised"  # supervised (LM head + loss only at supervised positions) | full (all logits)
    loss_chunk_tokens: int = 8192  # supervised rows per LM-head/loss chunk; more chunks are recomputed in backward
    # the objective per supervised token: ce (cross-entropy) | dft (Dynamic Fine-Tuning: CE times the token's
    # detached probability); the logged loss stays the cross-entropy (docs/training.md#loss-options)
    loss: str = "ce"
    # what weighs the same in a step: token (every supervised token) | sequence (every sample: the mean of
    # each sample's token mean, however long its reply)
    loss_normalization: str = "token"
    # NEFTune: uniform noise of scale alpha / sqrt(length * hidden) on the input embeddings, in training
    # forwards only (never eval or generation); 5 is the paper's usual value, 0 = off
    neftune_alpha: float = 0.0
    # fused GPU kernels: none | liger (Liger's RMSNorm, SwiGLU, RoPE and fused linear cross-entropy in the
    # supervised head, where liger-kernel is installed and the model supports them; else one log line and the
    # plain path)
    kernels: str = "none"
    compile: bool = False  # torch.compile each decoder block (docs/training.md#kernels-and-compile)
    eval_every: int = 0  # optimizer steps between eval passes (0 = only after the last step)
    eval_at_start: bool = True  # eval before the first step: the step-0 baseline of eval_loss_delta/<source>
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    seed: int = 42
    save_every: int = 0  # optimizer steps between checkpoints (0 = none; a final one is saved on stop_at_step)
    keep_last: int = 2  # checkpoints kept; older ones are deleted once a newer one is complete
    resume: str = "auto"  # auto (latest complete checkpoint in output_dir, if any) | never | a checkpoint path
    stop_at_step: Optional[int] = None  # checkpoint and exit once the run has reached this (absolute) step
    stop_after_steps: Optional[int] = None  # checkpoint and exit after this many steps in this process (requeue loops)
    stop_after_minutes: Optional[float] = None  # checkpoint and exit before this much wall-clock time has passed
    overwrite: bool = False  # allow replacing a finished or unresumable run already in output_dir
    resume_allow_changes: bool = False  # resume even if batch, seed, length, tokenizer, data or loss differ (logged)
    # a step whose loss or grad norm is NaN/inf: stop (exit 1, nothing saved from it) | skip (drop its update)
    on_nonfinite: str = "stop"
    max_consecutive_nonfinite: int = 5  # on_nonfinite=skip: non-finite steps skipped in a row before stopping

    def __post_init__(self) -> None:
        check_choice("train.schedule", self.schedule, SCHEDULES)
        check_choice("train.lm_head", self.lm_head, ("supervised", "full"))
        check_positive("train.loss_chunk_tokens", self.loss_chunk_tokens)
        check_choice("train.loss", self.loss, LOSSES)
        check_choice("train.loss_normalization", self.loss_normalization, LOSS_NORMALIZATIONS)
        check_positive("train.neftune_alpha", self.neftune_alpha, allow_zero=True)
        check_choice("train.kernels", self.kernels, ("none", "liger"))
        if self.lr is not None:
            check_positive("train.lr", self.lr)
        check_positive("train.micro_batch_size", self.micro_batch_size)
        check_positive("train.global_batch_size", self.global_batch_size)
        check_positive("train.max_length", self.max_length)
        check_positive("train.eval_every", self.eval_every, allow_zero=True)
        check_positive("train.save_every", self.save_every, allow_zero=True)
        check_positive("train.keep_last", self.keep_last)
        for key in ("stop_at_step", "stop_after_steps", "stop_after_minutes"):
            if getattr(self, key) is not None:
                check_positive(f"train.{key}", getattr(self, key))
        check_positive("train.grad_clip", self.grad_clip, allow_zero=True)
        if self.max_steps == 0 or self.max_steps < -1:
            raise ConfigError(f"train.max_steps={self.max_steps} must be > 0, or -1 to use train.epochs")
        if self.max_steps == -1:
            check_positive("train.epochs", self.epochs)
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"train.warmup_ratio={self.warmup_ratio} must be in [0, 1)")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"train.min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        if len(self.adam_betas) != 2:
            raise ConfigError(f"train.adam_betas={self.adam_betas} needs two values")
        check_choice("train.on_nonfinite", self.on_nonfinite, ("stop", "skip"))
        check_positive("train.max_consecutive_nonfinite", self.max_consecutive_nonfinite)


@dataclass
class LoggingConfig:
    """Console, metrics file and Weights & Biases (group ``logging/``)."""

    log_every: int = 1  # optimizer steps between console lines (metrics.jsonl gets every step)
    wandb_mode: str = "disabled"  # online | offline | disabled
    wandb_project: str = "sftdist"
    wandb_entity: Optional[str] = None
    wandb_group: Optional[str] = None
    wandb_tags: List[str] = field(default_factory=list)
    wandb_dir: Optional[str] = None  # where W&B writes its files; default $WANDB_DIR, else the run directory
    wandb_legacy_names: bool = True  # also log the pre-0.2 names train/<key>, eval/<key> of the older metrics
    progress: str = "auto"  # console: auto (a bar on a terminal, else lines) | bar | lines
    peak_flops: Optional[float] = None  # per-device peak FLOP/s for mfu; default: known GPUs, measured on CPU
    samples: int = 0  # greedy generations per eval pass: sample_prompts, else the first records of eval splits
    sample_prompts: List[str] = field(default_factory=list)  # user messages to answer (chat template applied)
    sample_max_new_tokens: int = 64

    def __post_init__(self) -> None:
        check_choice("logging.wandb_mode", self.wandb_mode, WANDB_MODES)
        check_positive("logging.log_every", self.log_every)
        check_choice("logging.progress", self.progress, PROGRESS)
        if self.peak_flops is not None:
            check_positive("logging.peak_flops", self.peak_flops)
        check_positive("logging.samples", self.samples, allow_zero=True)
        check_positive("logging.sample_max_new_tokens", self.sample_max_new_tokens)


@dataclass
class SFTConfig:
    """The root schema: every group plus the run directory."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallelism: ParallelConfig = field(default_factory=ParallelConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    output_dir: str = "???"  # the run directory, shared by all ranks
    run_name: Optional[str] = None  # W&B run name; defaults to the output_dir's basename

    def __post_init__(self) -> None:
        if self.train.lr is None:  # written resolved to the run's config.yaml, so a resume keeps it
            self.train.lr = default_lr(self.model, self.peft)


# The usual peak rates of each kind of run (train.lr=null picks one). Full fine-tuning moves every weight of a
# pretrained model, so SFT keeps it small (1e-5 to 5e-5); a LoRA adapter starts at zero with few parameters and
# needs ~10x that; a model trained from scratch (random init) learns at pre-training rates.
FULL_FT_LR = 2e-5
LORA_LR = 2e-4
FROM_SCRATCH_LR = 3e-3


def default_lr(model: ModelConfig, peft: PeftConfig) -> float:
    """The peak learning rate of ``train.lr=null``: by what is trained.

    Example:
        >>> default_lr(ModelConfig(name_or_path="Qwen/Qwen2.5-0.5B-Instruct"), PeftConfig())
        2e-05
        >>> default_lr(ModelConfig(name_or_path="Qwen/Qwen2.5-0.5B-Instruct"), PeftConfig(method="lora"))
        0.0002
        >>> default_lr(ModelConfig(from_config={"model_type": "llama"}, tokenizer="gpt2"), PeftConfig("lora"))
        0.003
    """
    if model.from_config and not model.name_or_path:
        return FROM_SCRATCH_LR
    return LORA_LR if peft.method != "none" else FULL_FT_LR


def grad_accum_steps(train: TrainConfig, dp_world: int) -> int:
    """Micro-batches each rank runs per optimizer step: global / (micro x data-parallel world)."""
    return train.global_batch_size // (train.micro_batch_size * dp_world)

