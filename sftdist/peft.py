"""Wrap the model with a PEFT adapter before DeepSpeed sees it; the training loop does not change."""

from __future__ import annotations

from pathlib import Path

from sftdist.config import ConfigError, PeftConfig


def apply_peft(model, cfg: PeftConfig):
    """Return ``model`` unchanged for ``method: none``, else a LoRA ``PeftModel`` with only adapters trainable
    (for ``qlora`` the model must have been loaded 4-bit, see ``build_model``)."""
    if cfg.method == "none":
        return model
    from peft import LoraConfig, get_peft_model

    targets = "all-linear" if list(cfg.target_modules) == ["all-linear"] else list(cfg.target_modules)
    lora = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
                      modules_to_save=cfg.modules_to_save, use_dora=cfg.use_dora, use_rslora=cfg.use_rslora,
                      task_type="CAUSAL_LM")
    if cfg.method == "qlora":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=model.is_gradient_checkpointing)
    elif getattr(model, "is_gradient_checkpointing", False):
        model.enable_input_require_grads()  # checkpointed blocks need an input that requires grad
    try:
        return get_peft_model(model, lora)
    except ValueError as e:  # peft's NoMatchingPeftModuleError (a ValueError) for targets that match nothing
        if "not found in the base model" not in str(e):
            raise
        raise ConfigError(f"peft.target_modules={list(cfg.target_modules)} matches no module of the model; its "
                          f"linear layers are: {', '.join(linear_module_names(model))} (or use [all-linear])") from e


def linear_module_names(model) -> list[str]:
    """The distinct last-name parts of the model's ``nn.Linear`` layers (what LoRA target_modules match)."""
    import torch

    names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    return sorted(names)


def trainable_summary(model) -> str:
    """``"trainable 1.2M / 125.0M parameters (0.98%)"``."""
    total = trainable = 0
    for p in model.parameters():
        n = p.ds_numel if hasattr(p, "ds_numel") else p.numel()
        total += n
        trainable += n if p.requires_grad else 0
    return f"trainable {trainable / 1e6:.2f}M / {total / 1e6:.2f}M parameters ({100 * trainable / max(total, 1):.2f}%)"


def merge_adapter(run_dir: Path, *, out_name: str = "final_merged") -> Path:
    """Write ``run_dir/final_merged``: the run's base model with the adapter in ``final/`` merged in.

    The base is rebuilt from the run's ``config.yaml``: loaded from ``model.name_or_path``, or for a
    random-init model rebuilt from ``model.from_config`` and ``train.seed`` (sftdist builds those whole,
    without zero.Init, so the rebuild is exact). Runs in one process, on CPU memory.

    Raises:
        ConfigError: when ``final/`` holds no adapter.
        CheckpointError: when the merged model cannot be written (disk full); no partial directory is left.
    """
    import json

    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer

    from sftdist.checkpoint import write_whole_dir
    from sftdist.config import ConfigError, SFTConfig, load_run_config
    from sftdist.model import build_model

    final = run_dir / "final"
    if not (final / "adapter_config.json").exists():
        raise ConfigError(f"{final} holds no LoRA adapter (was the run trained with peft=lora?)")
    cfg: SFTConfig = load_run_config(run_dir)
    ds_config = json.loads((run_dir / "ds_config.json").read_text())
    precision = "bf16" if ds_config["bf16"]["enabled"] else "fp32"
    # The run's own setting, never more: final/ keeps a remote-code tokenizer's auto_map.
    tokenizer = AutoTokenizer.from_pretrained(final, trust_remote_code=cfg.model.trust_remote_code)
    base = build_model(cfg.model, tokenizer, precision=precision, activation_checkpointing=False, seed=cfg.train.seed)
    merged = PeftModel.from_pretrained(base, final).merge_and_unload()
    out = run_dir / out_name

    def write(tmp: Path) -> None:
        with torch.no_grad():
            merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    write_whole_dir(out, write, what="the merged model", hint=f"final/ (the adapter) is complete; free space and "
                    f"write the merged model with: sftdist-export --merge {run_dir}")
    return out
