"""What makes a resumed run the same run: the settings and data that decide which samples each step sees.

The sample order is a pure function of the step, the mixed data and a few settings (``loader.py``). A
checkpoint stores them in ``trainer_state.json``; a resume compares them with the new run's and stops with an
error naming every difference, since a changed global batch size, seed, max_length, tokenizer or data set
would silently shift the samples of every later step. The loss options are compared too: a changed objective
would silently train the rest of the run toward something else. ``train.resume_allow_changes=true`` resumes
anyway and logs the differences. Learning rate, schedule, run length and logging may change freely.
"""

from __future__ import annotations

from typing import Any

from sftdist.config import ConfigError, SFTConfig
from sftdist.data.prepare import PIPELINE_VERSION, tokenizer_fingerprint


# What each source's records become: every DataSource field but its name, its weight (compared on its own)
# and ``generic``, which only says which eval curves are the forgetting curve.
SOURCE_KEYS = ("path", "format", "columns", "max_samples", "split", "config", "revision", "eval_fraction",
               "eval_path", "streaming")
# What each step trains toward: the loss, what weighs the same in it, and the noise its forward adds.
LOSS_KEYS = ("loss", "loss_normalization", "neftune_alpha")
DATA_KEYS = ("train_on", "split_turns", "truncation", "on_bad_record", "dedup", "min_reply_tokens", "drop_cut_replies")


def run_settings(cfg: SFTConfig, tokenizer) -> dict[str, Any]:
    """The settings that decide the sample order, the token ids and the loss, as ``{config key: value}``, one
    key per config field, so that a refused resume names the field. An unset value and its explicit empty
    default (``columns: {}``, ``eval_fraction: 0``) are the same value. A source's files are compared by the
    records the data stage kept (``data_summary``), not by their size or time, so a copied or touched file
    resumes.
    """
    t, d = cfg.train, cfg.data
    settings: dict[str, Any] = {
        "train.global_batch_size": t.global_batch_size, "train.seed": t.seed, "train.max_length": t.max_length,
        "data.packing": d.packing, "data.mix_by": d.mix_by, "tokenizer": tokenizer_fingerprint(tokenizer),
        "data.sources": [s.name for s in d.sources], "data.pipeline_version": PIPELINE_VERSION,
    }
    settings["model"] = model_identity(cfg)
    settings |= {f"train.{k}": getattr(t, k) for k in LOSS_KEYS}
    settings |= {f"data.{k}": getattr(d, k) for k in DATA_KEYS}
    if d.dedup == "near":
        settings["data.near_dup_threshold"] = d.near_dup_threshold
    if any(s.streaming for s in d.sources):  # (the buffer decides which samples a streamed step gets)
        settings["data.stream_buffer"] = d.stream_buffer
    for s in d.sources:
        settings[f"data.sources[{s.name}].weight"] = s.weight
        settings |= {f"data.sources[{s.name}].{k}": getattr(s, k) or None for k in SOURCE_KEYS}
    return settings


SHAPE_KEYS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "vocab_size")


def model_identity(cfg: SFTConfig) -> str:
    """What the checkpoint's weights must fit: the model's shape (from its config, not its path, so that a
    moved local copy still resumes) and the adapter. A checkpoint of another model would otherwise fail deep
    inside DeepSpeed with a tensor-shape mismatch, after the model was loaded.

    Example:
        >>> from sftdist.config import ModelConfig
        >>> model_identity(SFTConfig(model=ModelConfig(tokenizer="t", from_config={"model_type": "llama",
        ...                                                                     "hidden_size": 64})))
        'llama hidden_size=64; full fine-tuning'
    """
    m, p = cfg.model, cfg.peft
    if m.from_config:
        shape = dict(m.from_config)
    else:
        try:
            from transformers import AutoConfig

            shape = AutoConfig.from_pretrained(m.name_or_path, revision=m.revision,
                                               trust_remote_code=m.trust_remote_code).to_dict()
        except Exception:  # noqa: BLE001 - unreadable here: the name is the best identity left
            shape = {"model_type": m.name_or_path}
    text = " ".join([str(shape.get("model_type")), *(f"{k}={shape[k]}" for k in SHAPE_KEYS[1:] if k in shape)])
    adapter = "full fine-tuning" if p.method == "none" else \
        f"{p.method} r={p.r} targets={sorted(p.target_modules)} dora={p.use_dora}"
    return f"{text}; {adapter}"


def data_summary(stats: dict[str, dict]) -> dict[str, Any]:
    """Per source, what the data stage kept: ``{data.sources[name].records: [records, kept, tokens,
    supervised tokens]}`` from each source's cached ``stats.json``."""
    return {f"data.sources[{name}].records": [s["records"], s["kept"], s["tokens"], s["supervised_tokens"]]
            for name, s in stats.items()}


def differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """``key: saved -> now`` for every key of ``now`` that the checkpoint recorded with another value.

    Example:
        >>> differences({"train.seed": 1, "train.max_length": 512}, {"train.seed": 2, "train.max_length": 512})
        ['train.seed: 1 -> 2']
    """
    return [f"{k}: {saved[k]} -> {v}" for k, v in now.items() if k in saved and saved[k] != v]


def check_unchanged(saved: dict[str, Any], now: dict[str, Any], *, checkpoint: str, allow: bool) -> list[str]:
    """Raise unless the resumed run sees the same samples; return the differences that ``allow`` accepts.

    Raises:
        ConfigError: naming the checkpoint and each changed key.
    """
    changed = differences(saved, now)
    if changed and not allow:
        raise ConfigError(
            f"cannot resume from {checkpoint}: this run differs from the one that wrote it in its model or in what "
            f"each step trains on ({'; '.join(changed)}). Resume with the same settings, start a new output_dir, or "
            f"set train.resume_allow_changes=true to resume anyway")
    return changed
