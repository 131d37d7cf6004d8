"""Wrap the model with a PEFT adapter before DeepSpeed sees it; the training loop does not change."""

from __future__ import annotations

from sftdist.config import PeftConfig


def apply_peft(model, cfg: PeftConfig):
    """Return ``model`` unchanged for ``method: none``, else a LoRA ``PeftModel`` with only adapters trainable."""
    if cfg.method == "none":
        return model
    from peft import LoraConfig, get_peft_model

    targets = "all-linear" if list(cfg.target_modules) == ["all-linear"] else list(cfg.target_modules)
    lora = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
                      modules_to_save=cfg.modules_to_save, task_type="CAUSAL_LM")
    if getattr(model, "is_gradient_checkpointing", False):
        model.enable_input_require_grads()  # checkpointed blocks need an input that requires grad
    return get_peft_model(model, lora)


def trainable_summary(model) -> str:
    """``"trainable 1.2M / 125.0M parameters (0.98%)"``."""
    total = trainable = 0
    for p in model.parameters():
        n = p.ds_numel if hasattr(p, "ds_numel") else p.numel()
        total += n
        trainable += n if p.requires_grad else 0
    return f"trainable {trainable / 1e6:.2f}M / {total / 1e6:.2f}M parameters ({100 * trainable / max(total, 1):.2f}%)"
