"""Load the tokenizer and build or load the causal LM that a ``ModelConfig`` names."""

from __future__ import annotations

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

    path = resolve_builtin(cfg.tokenizer or cfg.name_or_path)
    try:
        tok = AutoTokenizer.from_pretrained(path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.tokenizer: cannot load tokenizer {path!r}: {e}") from e
    if tok.pad_token_id is None:
        # Padding positions are never attended to nor trained on, so any id works; EOS is always present.
        tok.pad_token = tok.eos_token
    return tok


def build_model(cfg: ModelConfig, tokenizer, *, precision: str, activation_checkpointing: bool, seed: int,
                quantize_4bit: bool = False):
    """Build a random-init model from ``cfg.from_config`` or load ``cfg.name_or_path``.

    A model built from a config gets its vocabulary sized to the tokenizer; a loaded model is resized
    only if the tokenizer has more tokens than its embedding.

    Args:
        cfg: The model config group.
        tokenizer: The run's tokenizer (for vocabulary size and special token ids).
        precision: ``fp32``, ``bf16`` or ``fp16``: the dtype the weights are created in.
        activation_checkpointing: Recompute activations in backward.
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
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model


def _nf4_config(dtype):
    from transformers import BitsAndBytesConfig

    # quant_storage in the compute dtype lets ZeRO-3 partition the 4-bit weights like any other tensor.
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=dtype)
