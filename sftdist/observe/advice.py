"""Practitioners' advice, logged once at the start of a run (rank 0): never an error, only a nudge.

- A pretrained model (``model.name_or_path``) fully fine-tuned without a ``peft`` choice gets the memory
  its full fine-tune needs per rank, from ``sftdist-plan``'s arithmetic, beside the LoRA figure, and on
  fewer than 8 GPUs the advice that LoRA is the default choice there.
- A pretrained model trained at a high ``train.lr`` gets a warning with the number and the usual range:
  above 1e-4 for full fine-tuning (pre-training rates overwrite what the model already knows), above 5e-4
  for LoRA/QLoRA (the adapter's update then swamps the base: a 135M chat model lost "the capital of France is
  Paris" in 30 LoRA steps at 3e-3).
"""

from __future__ import annotations

from typing import Optional

from sftdist.config import PeftConfig, SFTConfig
from sftdist.engine.memory_plan import GIB, ModelShape, Setup, model_states

FULL_FT_LR_MAX = 1e-4  # above this a full fine-tune of a pretrained model is likely to forget
LORA_LR_MAX = 5e-4  # LoRA's usual range is 1e-4 to 3e-4 (QLoRA: 1e-4 to 2e-4); above this it forgets too
LORA_BELOW_WORLD = 8  # fewer GPUs than a node: LoRA is the practical default


def lr_warning(cfg: SFTConfig) -> Optional[str]:
    """A warning for a pretrained model trained at an lr above the usual range of its method (full
    fine-tuning: ``FULL_FT_LR_MAX``, LoRA/QLoRA: ``LORA_LR_MAX``); None else, and for a model built from
    scratch.

    Example:
        >>> cfg = SFTConfig()
        >>> cfg.model.name_or_path, cfg.train.lr = "Qwen/Qwen2.5-7B-Instruct", 3e-4
        >>> print(lr_warning(cfg))
        warning: train.lr=0.0003 is high for full fine-tuning of a pretrained model (Qwen/Qwen2.5-7B-Instruct): SFT usually uses 1e-5 to 5e-5 (recipe=full_zero3: 1e-5), or LoRA at 1e-4 to 2e-4 (recipe=lora_single_gpu)
        >>> cfg.peft.method, cfg.train.lr = "lora", 3e-3
        >>> print(lr_warning(cfg))
        warning: train.lr=0.003 is high for LoRA of a pretrained model (Qwen/Qwen2.5-7B-Instruct): LoRA usually uses 1e-4 to 3e-4 (recipe=lora_single_gpu: 2e-4); above 0.0005 the model forgets what it knew (watch forgetting/answer_agreement)
        >>> cfg.train.lr = 2e-4
        >>> lr_warning(cfg) is None
        True
    """
    if not cfg.model.name_or_path:
        return None
    lr, name = cfg.train.lr, cfg.model.name_or_path
    if cfg.peft.method == "none" and lr > FULL_FT_LR_MAX:
        return (f"warning: train.lr={lr:g} is high for full fine-tuning of a pretrained model ({name}): SFT "
                f"usually uses 1e-5 to 5e-5 (recipe=full_zero3: 1e-5), or LoRA at 1e-4 to 2e-4 "
                f"(recipe=lora_single_gpu)")
    if cfg.peft.method != "none" and lr > LORA_LR_MAX:
        method = "QLoRA" if cfg.peft.method == "qlora" else "LoRA"
        return (f"warning: train.lr={lr:g} is high for {method} of a pretrained model ({name}): {method} usually "
                f"uses 1e-4 to 3e-4 (recipe=lora_single_gpu: 2e-4); above {LORA_LR_MAX:g} the model forgets what "
                f"it knew (watch forgetting/answer_agreement)")
    return None


def _states(shape: ModelShape, setup: Setup) -> str:
    """Device bytes of the model states of one rank, e.g. ``130.4 GiB`` or ``52 MiB``."""
    b = sum(dev for dev, _ in model_states(shape, setup).values())
    return f"{b / GIB:,.1f} GiB" if b >= GIB else f"{b / 2**20:,.0f} MiB"


def full_finetune_advice(full: ModelShape, lora: ModelShape, setup: Setup) -> str:
    """The advice for a full fine-tune nobody chose: its per-rank model states against LoRA's, and on fewer
    than ``LORA_BELOW_WORLD`` GPUs the suggestion to use LoRA.

    Example (7B parameters, bf16, ZeRO-2 on one GPU; a 40M-parameter adapter):
        >>> full = ModelShape(params=7_000_000_000, trainable=7_000_000_000, quantized=0, largest_module=10**9,
        ...                   layers=28, hidden=3584, heads=28, vocab=152064)
        >>> lora = ModelShape(**{**vars(full), "params": 7_040_000_000, "trainable": 40_000_000})
        >>> print(full_finetune_advice(full, lora, Setup(zero_stage=2, world=1, precision="bf16")))
        advice: full fine-tuning of 7,000M parameters needs ~130.4 GiB per rank for weights, gradients and Adam states alone (ZeRO-2, 1 rank, bf16); LoRA (peft=lora, r=16) needs ~13.8 GiB
        advice: on fewer than 8 GPUs LoRA is the default choice: recipe=lora_single_gpu, or peft=lora; sftdist-plan adds activations to these figures; peft=none keeps full fine-tuning and this quiet
    """
    lines = [f"advice: full fine-tuning of {full.params / 1e6:,.0f}M parameters needs "
             f"~{_states(full, setup)} per rank for weights, gradients and Adam states alone "
             f"(ZeRO-{setup.zero_stage}, {setup.world} rank{'s' * (setup.world > 1)}, {setup.precision}); "
             f"LoRA (peft=lora, r=16) needs ~{_states(lora, Setup(**{**vars(setup), 'peft': 'lora'}))}"]
    if setup.world < LORA_BELOW_WORLD:
        lines.append(f"advice: on fewer than {LORA_BELOW_WORLD} GPUs LoRA is the default choice: "
                     f"recipe=lora_single_gpu, or peft=lora; sftdist-plan adds activations to these figures; "
                     f"peft=none keeps full fine-tuning and this quiet")
    else:
        lines.append("advice: sftdist-plan adds activations to this figure; peft=none keeps full fine-tuning "
                     "and this quiet")
    return "\n".join(lines)


def startup_advice(cfg: SFTConfig, model_config, *, peft_was_chosen: bool, world: int, precision: str,
                   grad_accum_fp32: bool) -> list[str]:
    """The advice lines for this run (empty when there is none): the full fine-tune advice for a pretrained
    model without a peft choice, and the lr warning.

    Args:
        cfg: The run config.
        model_config: The model's transformers config (its shape is counted on the meta device).
        peft_was_chosen: ``peft_chosen`` of the command line.
        world, precision, grad_accum_fp32: The data-parallel world, resolved precision, and whether ZeRO
            accumulates bf16 gradients in fp32, as the run will use them.
    """
    from sftdist.engine.memory_plan import model_shape

    lines = []
    if cfg.model.name_or_path and cfg.peft.method == "none" and not peft_was_chosen:
        p = cfg.parallelism
        setup = Setup(zero_stage=p.zero_stage, world=world, precision=precision,
                      offload_optimizer=p.offload_optimizer, offload_params=p.offload_params,
                      grad_accum_fp32=grad_accum_fp32)
        lines += full_finetune_advice(model_shape(model_config, cfg.peft),
                                      model_shape(model_config, PeftConfig(method="lora")), setup).splitlines()
    if warning := lr_warning(cfg):
        lines.append(warning)
    return lines
