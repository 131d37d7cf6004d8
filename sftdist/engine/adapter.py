"""Wrap the model with a PEFT adapter before DeepSpeed sees it; the training loop does not change."""

from __future__ import annotations

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


def base_model(model):
    """The Hugging Face model under a DeepSpeed engine and/or a PEFT wrapper."""
    model = getattr(model, "module", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model
