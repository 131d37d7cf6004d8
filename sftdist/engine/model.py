"""Load the tokenizer and build or load the causal LM that a ``ModelConfig`` names."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from sftdist.config import ConfigError, ModelConfig
from sftdist.data.demo import resolve_builtin

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def load_tokenizer(cfg: ModelConfig):
    """The tokenizer of ``model.tokenizer`` (or of the model itself), with a pad token.

    Raises:
        ConfigError: when the tokenizer cannot be loaded; the message names the path or id.
    """
    from transformers import AutoTokenizer

    check_local_path("model.name_or_path", cfg.name_or_path)
    check_local_path("model.tokenizer", cfg.tokenizer)
    path = resolve_builtin(cfg.tokenizer or cfg.name_or_path)
    if cfg.trust_remote_code:
        warn_remote_code("tokenizer", path)
    try:
        tok = AutoTokenizer.from_pretrained(path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.tokenizer: cannot load tokenizer {path!r}: {e}") from e
    if cfg.chat_template:
        tok.chat_template = chat_template_text(cfg.chat_template)
    if tok.pad_token_id is None:
        # Padding positions are never attended to nor trained on, so any id works; EOS is always present.
        tok.pad_token = tok.eos_token
    return tok


def warn_remote_code(what: str, path: str) -> None:
    """Say on rank 0 whose code ``model.trust_remote_code=true`` lets transformers import and run: the Python
    files that ``path`` ships (its ``auto_map``), with the job's permissions. Off by default; only the
    explicit key turns it on, and then the log names the source so that a surprise is visible."""
    from sftdist.engine.distributed import log

    log(f"warning: model.trust_remote_code=true: the {what} {path!r} may run its own Python code (the auto_map "
        f"modules of its directory or hub repo) in this process; use it only for a source you trust")


def looks_local(name: str) -> bool:
    """Whether a model/tokenizer name is a local path rather than a hub id (``org/name``: one slash).

    Example:
        >>> [looks_local(n) for n in ("Qwen/Qwen2.5-0.5B", "/models/qwen", "./qwen", "~/m", "models/org/qwen")]
        [False, True, True, True, True]
    """
    return name.startswith(("/", ".", "~")) or name.count("/") > 1


def check_local_path(key: str, name: Optional[str]) -> None:
    """Raise a ``ConfigError`` naming ``key`` and the path when a local model/tokenizer path does not exist,
    before transformers reports it as an invalid hub repo id."""
    if name and not name.startswith("builtin:") and looks_local(name) and not Path(name).expanduser().exists():
        raise ConfigError(f"{key}={name}: no such file or directory (a local path; for a hub model give its id, "
                          f"e.g. Qwen/Qwen2.5-0.5B-Instruct)")


def chat_template_text(value: str) -> str:
    """``model.chat_template``: the text of a template file, or the value itself when it is template text."""
    path = Path(value).expanduser()
    if path.is_file():
        return path.read_text(encoding="utf-8")
    if "{%" in value or "{{" in value:
        return value
    raise ConfigError(f"model.chat_template={value}: no such file, and not Jinja template text either (give the "
                      f"path of a .jinja file, or the template itself)")


def build_model(cfg: ModelConfig, tokenizer, *, precision: str, activation_checkpointing: bool, seed: int,
                quantize_4bit: bool = False, offload_checkpoints: bool = False):
    """Build a random-init model from ``cfg.from_config`` or load ``cfg.name_or_path``.

    A model built from a config gets its vocabulary sized to the tokenizer; a loaded model is resized
    only if the tokenizer has more tokens than its embedding.

    Args:
        cfg: The model config group.
        tokenizer: The run's tokenizer (for vocabulary size and special token ids).
        precision: ``fp32``, ``bf16`` or ``fp16``: the dtype the weights are created in.
        activation_checkpointing: Recompute activations in backward.
        offload_checkpoints: Keep what checkpointing saves (each layer's input) in host memory
            (``parallelism.activation_checkpointing_offload``; transformers' ``offload``).
        seed: Seed for random initialisation.
        quantize_4bit: Load the weights NF4-quantised with bitsandbytes (QLoRA; CUDA only).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = DTYPES[precision]
    if cfg.from_config:
        kwargs = dict(cfg.from_config)
        model_config = AutoConfig.for_model(kwargs.pop("model_type"), vocab_size=len(tokenizer), **kwargs)
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(model_config, dtype=dtype,
                                                 attn_implementation=cfg.attn_implementation)
    else:
        if cfg.trust_remote_code:
            warn_remote_code("model", cfg.name_or_path)
        try:
            model = AutoModelForCausalLM.from_pretrained(
                cfg.name_or_path, dtype=dtype, attn_implementation=cfg.attn_implementation,
                revision=cfg.revision, trust_remote_code=cfg.trust_remote_code,
                quantization_config=_nf4_config(dtype) if quantize_4bit else None)
        except OSError as e:
            raise ConfigError(f"model.name_or_path: cannot load {cfg.name_or_path!r}: {e}") from e
        # num_embeddings, not weight.shape: under ZeRO-3 the local weight is an empty partition, and a
        # needless resize would replace the partitioned embedding with a full copy on every rank.
        if len(tokenizer) > model.get_input_embeddings().num_embeddings:
            model.resize_token_embeddings(len(tokenizer))
    # Generation must stop at the end-of-turn token that training supervised.
    for c in (model.config, model.generation_config):
        c.eos_token_id = tokenizer.eos_token_id
        c.pad_token_id = tokenizer.pad_token_id
    if activation_checkpointing:
        kwargs = {"use_reentrant": False}
        # each layer's saved input in pinned host memory, back for its recompute (on CPU it is there already)
        if offload_checkpoints and torch.cuda.is_available():
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs, offload=True)
        elif hasattr(model, "activation_checkpointing_enable"):  # newer transformers warn on the old name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.config.use_cache = False
    return model


def _nf4_config(dtype):
    from transformers import BitsAndBytesConfig

    # quant_storage in the compute dtype lets ZeRO-3 partition the 4-bit weights like any other tensor.
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=dtype)
