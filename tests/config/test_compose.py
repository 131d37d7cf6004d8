"""Every config file composes and validates; bad overrides fail with messages that name the key."""

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from sftdist.config import ConfigError, SFTConfig, validate
from tests.conftest import REPO, compose, run_cmd

# conf/hydra/ holds Hydra's own groups (the SLURM launcher), conf/sweep/ the optional +sweep presets.
GROUPS = sorted(p.name for p in (REPO / "conf").iterdir() if p.is_dir() and p.name not in ("hydra", "sweep"))


def options(group):
    return sorted(p.stem for p in (REPO / "conf" / group).glob("*.yaml"))


def test_all_groups_present():
    assert GROUPS == ["data", "launch", "logging", "model", "parallelism", "peft", "recipe", "train"]


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes_and_validates(group, option):
    extra = ["model=qwen2_5_0_5b"] if (group, option) == ("peft", "qlora") else []  # QLoRA quantises a pretrained model
    cfg = OmegaConf.to_object(compose([f"{group}={option}", *extra]))
    assert isinstance(cfg, SFTConfig)
    validate(cfg, dp_world=2, has_gpu=True)
    # Every YAML opens with a header comment giving a launch command.
    assert (REPO / "conf" / group / f"{option}.yaml").read_text().startswith("#")


def test_sweep_presets_and_slurm_launcher_compose():
    import sys

    import yaml

    def composed(*overrides):
        out = run_cmd([sys.executable, "-m", "sftdist.train", *overrides, "--cfg", "all", "--resolve"]).stdout
        return yaml.safe_load(out)

    assert composed("+sweep=lr")["hydra"]["sweeper"]["params"] == {"train.lr": "1e-5,2e-5,5e-5"}
    assert composed("+sweep=lora_lr")["hydra"]["sweeper"]["params"] == {"train.lr": "1e-4,2e-4,5e-4"}
    launcher = composed("hydra/launcher=slurm", "launch.partition=p1", "launch.time=1-02:00:00",
                        "launch.nproc_per_node=2", "launch.gpus_per_node=2", "launch.nnodes=3")["hydra"]["launcher"]
    assert {k: launcher[k] for k in ("partition", "timeout_min", "tasks_per_node", "gpus_per_node", "nodes")} == \
        {"partition": "p1", "timeout_min": 26 * 60, "tasks_per_node": 2, "gpus_per_node": 2, "nodes": 3}
    assert launcher["_target_"].endswith("SlurmLauncher")
    # srun --kill-on-bad-exit=1 for a sweep point's tasks: one dead rank ends the step
    assert "SLURM_KILL_BAD_EXIT=1" in launcher["additional_parameters"]["export"].split(",")


def test_defaults():
    cfg = OmegaConf.to_object(compose())
    assert cfg.model.tokenizer == "builtin:demo" and cfg.parallelism.zero_stage == 2
    assert cfg.peft.method == "none" and cfg.launch.launcher == "torchrun"
    assert [s.name for s in cfg.data.sources] == ["demo_chat", "demo_generic"]
    assert cfg.output_dir.startswith("outputs/")


def test_command_line_mix():
    cfg = OmegaConf.to_object(compose(["data.sources=[{name: mine, path: my.jsonl, format: messages, weight: 1}]"]))
    assert cfg.data.sources[0].path == "my.jsonl" and cfg.data.sources[0].weight == 1.0


@pytest.mark.parametrize("override,error,match", [
    (["train.lr=fast"], ConfigCompositionException, "train.lr"),
    (["train.not_a_key=1"], ConfigError, r"unknown config key 'train.not_a_key' \(train has: max_steps, "),
    (["train.early_stoping.patience=2"], ConfigError, "did you mean train.early_stopping.patience"),
    (["parallelism=zero9"], ConfigCompositionException, "zero9"),
])
def test_bad_overrides_fail_while_composing(override, error, match):
    with pytest.raises(error, match=match):
        compose(override)


@pytest.mark.parametrize("override,match", [
    (["parallelism.zero_stage=5"], "parallelism.zero_stage"),
    (["parallelism.precision=fp8"], "parallelism.precision"),
    (["parallelism=zero2", "parallelism.offload_params=true"], "offload_params"),
    (["train.max_steps=0"], "train.max_steps"),
    (["data.train_on=user"], "data.train_on"),
    (["logging.wandb_mode=maybe"], "logging.wandb_mode"),
    (["peft=lora", "peft.r=0"], "peft.r"),
    (["~model.from_config.model_type"], "model_type"),
])
def test_bad_values_fail_when_typed(override, match):
    with pytest.raises((ConfigError, ValidationError, ConfigKeyError), match=match):
        OmegaConf.to_object(compose(override))


@pytest.mark.parametrize("override,kw,match", [
    (["train.global_batch_size=10", "train.micro_batch_size=2"], {"dp_world": 2, "has_gpu": False},
     "global_batch_size=10 is not a multiple"),
    (["parallelism.precision=bf16"], {"dp_world": 1, "has_gpu": False}, "needs a GPU"),
    (["model.attn_implementation=flash_attention_2"], {"dp_world": 1, "has_gpu": False}, "needs a GPU"),
    (["model.from_config=null"], {"dp_world": 1, "has_gpu": False}, "model.name_or_path"),
    (["peft=qlora", "model=qwen2_5_0_5b"], {"dp_world": 1, "has_gpu": False}, "qlora .*needs a CUDA GPU"),
    (["peft=qlora"], {"dp_world": 1, "has_gpu": True}, "needs a pretrained model"),
])
def test_cross_group_validation(override, kw, match):
    with pytest.raises(ConfigError, match=match):
        validate(OmegaConf.to_object(compose(override)), **kw)
