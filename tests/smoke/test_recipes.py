"""``recipe=`` presets (conf/recipe/), and the advice a run logs for a pretrained model fine-tuned in full.

The presets are checked by composing them as ``python -m sftdist.train`` would; the advice and the lr warning
by two real single-process runs of a small pretrained-style model directory (saved with ``save_pretrained``).
"""

from __future__ import annotations

import pytest
import yaml

from sftdist.config import compose_config as typed
from tests.conftest import FAST, compose, train_single


def test_each_recipe_sets_what_its_comment_says():
    lora = compose(["recipe=lora_single_gpu"])
    assert (lora.peft.method, lora.peft.r, list(lora.peft.target_modules)) == ("lora", 16, ["all-linear"])
    assert (lora.parallelism.zero_stage, lora.parallelism.activation_checkpointing) == (2, True)
    assert (lora.train.lr, lora.train.max_steps, lora.train.warmup_ratio) == (2e-4, -1, 0.03)

    full = compose(["recipe=full_zero3"])
    assert (full.peft.method, full.parallelism.zero_stage, full.parallelism.activation_checkpointing) == \
        ("none", 3, True)
    assert full.train.lr == 1e-5

    replay = compose(["recipe=replay_1to1"])
    assert [(s.name, s.weight, s.generic) for s in replay.data.sources] == [("task", 0.5, None),
                                                                           ("generic", 0.5, True)]
    assert (replay.data.mix_by, replay.data.packing) == ("tokens", True)
    assert replay.peft.method == compose([]).peft.method  # a data recipe leaves the training setup alone
    assert compose([]).train.lr is None and typed([]).train.lr == 3e-3  # the demo's tiny model: from scratch


def test_defaults_fit_a_real_model_and_the_demo_keeps_its_rate():
    """train.lr follows what is trained (a LoRA user who only names a model must not train at the demo's
    3e-3, #25), max_length fits real chats, and a value on the command line still wins."""
    named = ["model.name_or_path=/models/SmolLM2-135M-Instruct"]  # on the tiny preset: prefer_named_model
    assert [typed(o).train.lr for o in (named, [*named, "peft=lora"], ["model=qwen2_5_0_5b", "peft=qlora"],
                                         ["model=qwen2_5_0_5b"], [*named, "peft=lora", "train.lr=1e-4"])] == \
        [2e-5, 2e-4, 2e-4, 2e-5, 1e-4]
    assert typed(named).train.max_length == typed([]).train.max_length == 2048


def test_command_line_beats_the_recipe_and_recipes_combine():
    cfg = compose(["recipe=full_zero3", "parallelism=zero3_offload", "train.lr=2e-5"])
    assert (cfg.parallelism.offload_optimizer, cfg.train.lr) == (True, 2e-5)
    assert cfg.parallelism.activation_checkpointing  # the recipe's value still applies on the chosen option
    cfg = compose(["parallelism=zero0", "recipe=lora_single_gpu", "peft.r=8"])  # order on the line is irrelevant
    assert (cfg.parallelism.zero_stage, cfg.peft.r, cfg.peft.method) == (0, 8, "lora")
    both = compose(["recipe=[lora_single_gpu,replay_1to1]"])
    assert (both.peft.method, both.train.lr, both.data.mix_by) == ("lora", 2e-4, "tokens")


def test_unknown_recipe_lists_the_real_ones():
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException) as e:
        compose(["recipe=lora_single"])
    assert "lora_single_gpu" in str(e.value) and "full_zero3" in str(e.value)


@pytest.fixture(scope="module")
def pretrained_dir(tmp_path_factory, demo_tokenizer):
    from transformers import AutoConfig, AutoModelForCausalLM

    d = tmp_path_factory.mktemp("pretrained") / "model"
    config = AutoConfig.for_model("llama", vocab_size=len(demo_tokenizer), hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
    AutoModelForCausalLM.from_config(config).save_pretrained(d)
    demo_tokenizer.save_pretrained(d)
    return d


def _advice(stdout: str) -> list[str]:
    return [line.split("] ", 1)[1] for line in stdout.splitlines() if "] advice: " in line or "] warning: train.lr" in line]


def test_full_fine_tune_of_a_pretrained_model_gets_advice_once(tmp_path, pretrained_dir):
    from transformers import AutoModelForCausalLM

    from sftdist.engine.memory_plan import Setup, model_shape, model_states

    proc = train_single([*FAST, "train.max_steps=1", f"model.name_or_path={pretrained_dir}", "train.lr=3e-3",
                         f"output_dir={tmp_path / 'run'}"])
    lines = _advice(proc.stdout)
    assert len(lines) == 3, proc.stdout  # the memory line, the LoRA line, the lr warning: each once
    params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(pretrained_dir).parameters())
    shape = model_shape(AutoModelForCausalLM.from_pretrained(pretrained_dir).config, compose([]).peft)
    mib = sum(d for d, _ in model_states(shape, Setup(zero_stage=2, world=1, precision="fp32")).values()) / 2**20
    assert f"full fine-tuning of {params / 1e6:,.0f}M parameters needs ~{mib:,.0f} MiB per rank" in lines[0]
    assert "(ZeRO-2, 1 rank, fp32)" in lines[0]
    assert "on fewer than 8 GPUs LoRA is the default choice" in lines[1]
    assert lines[2].startswith("warning: train.lr=0.003 is high") and "1e-5 to 5e-5" in lines[2]


def test_a_chosen_recipe_silences_the_advice_and_trains_lora(tmp_path, pretrained_dir):
    run = tmp_path / "run"
    proc = train_single(["recipe=lora_single_gpu", *FAST, "train.max_steps=1", f"model.name_or_path={pretrained_dir}",
                         f"output_dir={run}"])
    assert _advice(proc.stdout) == []
    assert "recipe: lora_single_gpu" in proc.stdout
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert (saved["peft"]["method"], saved["train"]["lr"], saved["parallelism"]["activation_checkpointing"]) == \
        ("lora", 2e-4, True)
    assert (run / "final" / "adapter_config.json").exists()
