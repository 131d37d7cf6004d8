"""Security, without training: no model or tokenizer code runs unless model.trust_remote_code says so (and
then the log names it); checkpoint files cannot run code (safe_load); secrets stay out of saved configs, logs
and generated scripts; no config value can break out of the generated shell (sbatch scripts, the deepspeed
launcher's pdsh command line); the data stage never writes in or beside the data. Each test plants the
hostile input for real (a module that leaves a marker file, a pickle that runs a command, fake tokens,
``$(touch ...)``) and checks that the marker never appears."""

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sftdist.config import ConfigError, LaunchConfig, ModelConfig
from tests.conftest import REPO, compose, run_cmd
from tests.unit.test_launch_commands import stand_ins

FAKE_SECRETS = {"WANDB_API_KEY": "fakewandbkey" + "0123456789abcdef" * 2 + "0123",
                "HF_TOKEN": "hf_FakeSecretForTheLeakTest8c1d2e3f", "HUGGING_FACE_HUB_TOKEN": "hf_OtherFakeSecret77a6b5"}


def tree(root: Path) -> dict:
    """Every entry under ``root`` (not following symlinks) with its size and mtime: to spot any write."""
    return {str(p.relative_to(root)): (p.lstat().st_size, p.lstat().st_mtime_ns) for p in [root, *root.rglob("*")]}


# --- 1. trust_remote_code -----------------------------------------------------------------------------


@pytest.fixture
def modules_cache(tmp_path, monkeypatch):
    """transformers copies remote code into HF_MODULES_CACHE before importing it: keep that in tmp_path."""
    import transformers.dynamic_module_utils as dmu

    monkeypatch.setattr(dmu, "HF_MODULES_CACHE", str(tmp_path / "hf_modules"))
    return tmp_path


def plant_module(directory: Path, name: str, base: str, cls: str, marker: Path) -> None:
    """A module that, when transformers imports it, leaves ``marker``: the stand-in for remote code."""
    (directory / f"{name}.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).touch()\n"
                                          f"from transformers import {base}\nclass {cls}({base}):\n    pass\n")


def test_trust_remote_code_is_off_unless_set():
    from omegaconf import OmegaConf

    assert ModelConfig().trust_remote_code is False
    for yaml in sorted((REPO / "conf" / "model").glob("*.yaml")):
        cfg = OmegaConf.to_object(compose([f"model={yaml.stem}"]))
        assert cfg.model.trust_remote_code is False, yaml.name


def test_remote_code_tokenizer_runs_only_when_asked(modules_cache, capsys):
    from sftdist.data.demo import resolve_builtin
    from sftdist.engine.model import load_tokenizer

    tok_dir, marker = modules_cache / "tok", modules_cache / "tokenizer_code_ran"
    shutil.copytree(resolve_builtin("builtin:demo"), tok_dir)
    plant_module(tok_dir, "tokenization_custom", "PreTrainedTokenizerFast", "CustomTokenizer", marker)
    config = json.loads((tok_dir / "tokenizer_config.json").read_text())
    config |= {"tokenizer_class": "CustomTokenizer",
               "auto_map": {"AutoTokenizer": [None, "tokenization_custom.CustomTokenizer"]}}
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(config))
    cfg = dict(tokenizer=str(tok_dir), from_config={"model_type": "llama"})

    with pytest.raises(ConfigError, match="contains custom code"):
        load_tokenizer(ModelConfig(**cfg))
    assert not marker.exists() and "trust_remote_code" not in capsys.readouterr().out
    tok = load_tokenizer(ModelConfig(**cfg, trust_remote_code=True))
    assert type(tok).__name__ == "CustomTokenizer" and marker.exists()
    assert f"warning: model.trust_remote_code=true: the tokenizer {str(tok_dir)!r}" in capsys.readouterr().out


def test_remote_code_model_runs_only_when_asked(modules_cache, demo_tokenizer, capsys):
    from transformers import AutoConfig, AutoModelForCausalLM

    from sftdist.engine.model import build_model

    model_dir, marker = modules_cache / "model", modules_cache / "model_code_ran"
    config = AutoConfig.for_model("llama", vocab_size=len(demo_tokenizer), hidden_size=16, intermediate_size=32,
                                  num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)
    plant_module(model_dir, "modeling_custom", "LlamaForCausalLM", "CustomForCausalLM", marker)
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps(config | {"auto_map": {
        "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}}))
    kw = dict(precision="fp32", activation_checkpointing=False, seed=0)

    model = build_model(ModelConfig(name_or_path=str(model_dir)), demo_tokenizer, **kw)
    assert type(model).__name__ == "LlamaForCausalLM" and not marker.exists()  # transformers' own class
    assert "trust_remote_code" not in capsys.readouterr().out
    model = build_model(ModelConfig(name_or_path=str(model_dir), trust_remote_code=True), demo_tokenizer, **kw)
    assert type(model).__name__ == "CustomForCausalLM" and marker.exists()
    assert f"warning: model.trust_remote_code=true: the model {str(model_dir)!r}" in capsys.readouterr().out


def test_hub_datasets_never_run_loading_scripts(monkeypatch):
    """A hub id goes to datasets.load_dataset with trust_remote_code=False (datasets 3.x would otherwise run
    a repo's loading script when asked; 4.x+ refuses scripts anyway). A spy: the real call needs the hub."""
    import datasets

    from sftdist.config import DataSource
    from sftdist.data.sources import read_records

    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **kw: calls.append(kw) or [{"text": "x"}])
    assert [row for _, row in read_records(DataSource(name="hub", path="someorg/somedata"))] == [{"text": "x"}]
    assert calls[0]["trust_remote_code"] is False


# --- 2. checkpoints load with weights_only=True ----------------------------------------------------------


def plant_pickle(path: Path, marker: Path) -> None:
    """A checkpoint-looking file whose unpickling runs ``touch marker``."""
    import torch

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    torch.save({"module": Payload(), "global_steps": 1}, path)


def test_guard_refuses_code_that_plain_deepspeed_loading_runs(tmp_path):
    import torch

    from sftdist.lifecycle.safe_load import FORCE, UnsafeCheckpointError, weights_only_loads

    evil, marker = tmp_path / "mp_rank_00_model_states.pt", tmp_path / "pwned"
    plant_pickle(evil, marker)
    with pytest.raises(UnsafeCheckpointError, match=r"refusing to load .*mp_rank_00_model_states.pt.*posix.system"):
        with weights_only_loads():
            torch.load(evil, weights_only=False)  # what DeepSpeed's TorchCheckpointEngine.load passes
    assert not marker.exists()
    assert torch.load.__module__ == "torch.serialization" and FORCE not in os.environ  # restored
    torch.load(evil, weights_only=False)  # the same call unguarded: the planted pickle does run
    assert marker.exists()


def test_guard_allows_deepspeed_checkpoint_types_and_restores_settings(tmp_path, monkeypatch):
    import torch
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    from sftdist.lifecycle.safe_load import FORCE, FORCE_OFF, weights_only_loads

    state = {"loss_scaler": LossScaler(1.0), "zero_stage": ZeroStageEnum.gradients, "w": torch.ones(3),
             "dyn": DynamicLossScaler(2.0 ** 16, 1000, 1, 2, False, dtype=torch.float16),
             "param_slice_mappings": [{"w": fragment_address(numel=3, start=0)}]}
    torch.save(state, tmp_path / "optim_states.pt")
    monkeypatch.setenv(FORCE_OFF, "1")  # a user's own setting: must not clash inside, and must come back
    with weights_only_loads():
        got = torch.load(tmp_path / "optim_states.pt", weights_only=False)
    assert got["zero_stage"] == ZeroStageEnum.gradients and got["loss_scaler"].cur_scale == 1.0
    assert got["dyn"].dtype == torch.float16 and got["param_slice_mappings"][0]["w"].numel == 3
    assert os.environ[FORCE_OFF] == "1" and FORCE not in os.environ


def test_safe_load_entry_runs_a_module_under_the_guard(tmp_path):
    """``python -m sftdist.lifecycle.safe_load MODULE`` (how checkpoint.universal_checkpoint runs ds_to_universal)."""
    evil, marker = tmp_path / "optim_states.pt", tmp_path / "pwned"
    plant_pickle(evil, marker)
    (tmp_path / "loads_it.py").write_text("import sys, torch\ntorch.load(sys.argv[1], weights_only=False)\n")
    proc = run_cmd([sys.executable, "-m", "sftdist.lifecycle.safe_load", "loads_it", str(evil)], check=False,
                   env={"PYTHONPATH": str(tmp_path)})
    assert proc.returncode != 0 and f"sftdist.lifecycle.safe_load: error: refusing to load {evil}" in proc.stderr
    assert not marker.exists()


# --- 3. secrets -----------------------------------------------------------------------------------------


def test_redaction_rules():
    import doctest

    import sftdist.config.redact
    from sftdist.config.redact import redact, secret_values

    assert doctest.testmod(sftdist.config.redact).failed == 0
    env = {**FAKE_SECRETS, "TOKENIZERS_PARALLELISM": "false", "SHORT_TOKEN": "1", "HOME": "/root"}
    assert set(secret_values(env).values()) == set(FAKE_SECRETS)
    cfg = {"train": {"loss_chunk_tokens": 8192}, "model": {"from_config": {"pad_token_id": 0, "eos_token": "x"}},
           "extra": {"hf_token": "anything", "password": "p", "api_key": None}}
    assert redact(cfg, {}) == {**cfg, "extra": {"hf_token": "<redacted>", "password": "<redacted>", "api_key": None}}


def test_saved_config_and_logs_hold_no_interpolated_secret(tmp_path, monkeypatch, capsys):
    """``run_name=x-${oc.env:HF_TOKEN}`` resolves to the token itself; config.yaml, ds_config.json and the
    console get ``${oc.env:HF_TOKEN}`` instead, and the saved config still loads back (merge_adapter)."""
    from omegaconf import OmegaConf

    from sftdist.config import SFTConfig
    from sftdist.engine.distributed import log
    from sftdist.lifecycle.rundir import prepare_run_dir

    for name, value in FAKE_SECRETS.items():
        monkeypatch.setenv(name, value)
    token = FAKE_SECRETS["HF_TOKEN"]
    cfg = OmegaConf.to_object(compose(["run_name=x-${oc.env:HF_TOKEN}", f"output_dir={tmp_path}"]))
    assert cfg.run_name == f"x-{token}"  # what Hydra resolves: the secret itself
    prepare_run_dir(tmp_path, overwrite=False, resume_step=None, config_yaml=OmegaConf.to_yaml(cfg),
                    ds_config={"aio": {"path": f"/nvme/{FAKE_SECRETS['WANDB_API_KEY']}"}})
    log(f"run name {cfg.run_name}")
    for text in ((tmp_path / "config.yaml").read_text(), (tmp_path / "ds_config.json").read_text(),
                 capsys.readouterr().out):
        assert not any(secret in text for secret in FAKE_SECRETS.values())
        assert "${oc.env:" in text
    reloaded = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(SFTConfig),
                                                   OmegaConf.load(tmp_path / "config.yaml")))
    assert reloaded.run_name == cfg.run_name and reloaded.train == cfg.train


def test_launcher_writes_no_secret_into_scripts_or_commands(tmp_path):
    env = {**FAKE_SECRETS}
    run_dir = tmp_path / "run"
    override = "run_name=x-${oc.env:HF_TOKEN}"
    slurm = run_cmd([sys.executable, "-m", "sftdist.cluster.launch", "--dry-run", "launch=slurm", "launch.prepare_first=true",
                     override, f"output_dir={run_dir}"], env=env)
    local = run_cmd([sys.executable, "-m", "sftdist.cluster.launch", "--dry-run", override, f"output_dir={run_dir}"], env=env)
    scripts = [(run_dir / name).read_text() for name in ("job.sbatch", "prepare.sbatch")]
    for text in (slurm.stdout, slurm.stderr, local.stdout, local.stderr, *scripts):
        assert not any(secret in text for secret in FAKE_SECRETS.values())
    assert all(f"'{override}'" in text for text in scripts)  # read at run time, single-quoted for the shell
    assert f"'{override}'" in local.stdout


# --- 4. generated shell -----------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["partition", "account", "qos", "time", "mem", "constraint", "job_name",
                                 "sbatch_extra", "setup"])
def test_sbatch_values_with_line_breaks_are_refused(key):
    value = "gpu\ntouch /tmp/pwned"
    with pytest.raises(ConfigError, match=f"launch.{key}"):
        LaunchConfig(**{key: [value] if key in ("sbatch_extra", "setup") else value})


def test_output_dir_with_a_line_break_cannot_reach_the_script(tmp_path):
    """output_dir lands in ``#SBATCH --output=``: a line break there would start a shell line of its own."""
    marker, run_dir = tmp_path / "pwned", tmp_path / f"a\ntouch {tmp_path / 'pwned'}\nb"
    proc = run_cmd([sys.executable, "-m", "sftdist.cluster.launch", "--dry-run", "launch=slurm", f"output_dir='{run_dir}'"],
                   check=False)
    assert proc.returncode != 0 and "a value holds a line break" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [] and not marker.exists()


def test_master_addr_must_be_a_host():
    for good in ("10.0.0.1", "node-1.cluster", "[::1]"):
        LaunchConfig(master_addr=good)
    with pytest.raises(ConfigError, match="launch.master_addr"):
        LaunchConfig(master_addr="n1;touch /tmp/pwned")
    with pytest.raises(ConfigError, match="launch.rdzv_endpoint"):
        LaunchConfig(rdzv_endpoint="$(touch /tmp/pwned):29400")


def hostile_overrides(tmp_path: Path) -> tuple[list[str], Path]:
    """Overrides whose values would run ``touch`` if any shell read them as code."""
    m = tmp_path / "pwned"
    values = {"run_name": f"$(touch {m}1)", "data.sources.0.path": f'x"; touch {m}2; echo "',
              "data.sources.1.path": f"`touch {m}3` and spaces", "launch.partition": f"$(touch {m}4)",
              "launch.job_name": f"`touch {m}5`", "model.revision": f"';touch {m}6;'"}
    run_dir = tmp_path / f"o$(touch {m}7)`touch {m}8`"
    return [f"{k}={json.dumps(v)}" for k, v in values.items()] + [f"output_dir='{run_dir}'"], run_dir


def test_sbatch_scripts_keep_hostile_values_inert(tmp_path):
    """Every config value in job.sbatch and prepare.sbatch, run by a real bash (stand-ins for srun, scontrol
    and python), from a working directory with a hostile name too."""
    overrides, run_dir = hostile_overrides(tmp_path)
    cwd = tmp_path / "cwd$(touch pwned9)`touch pwned10`"  # the markers land in tmp_path, where bash starts
    cwd.mkdir()
    proc = subprocess.run([sys.executable, "-m", "sftdist.cluster.launch", "--dry-run", "launch=slurm",
                           "launch.prepare_first=true", *overrides], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
    env = {**os.environ, "PATH": f"{stand_ins(tmp_path)}:{os.environ['PATH']}", "SLURM_JOB_ID": "1",
           "SLURM_JOB_NODELIST": "node1"}
    subprocess.run(["bash", str(run_dir / "job.sbatch")], check=True, env=env, cwd=tmp_path)
    argv = (tmp_path / "srun.argv").read_text().splitlines()
    # prepare.sbatch runs python itself: a bash function of that path records its arguments instead.
    record = f"{sys.executable}() {{ printf '%s\\0' \"$@\" > {tmp_path}/prepare.argv; }}"
    subprocess.run(["bash", "-c", f"{record}; source {shlex.quote(str(run_dir / 'prepare.sbatch'))}"], check=True,
                   env=env, cwd=tmp_path)
    prepare_argv = (tmp_path / "prepare.argv").read_text().split("\0")[:-1]
    assert not list(tmp_path.glob("pwned*"))
    from sftdist.cluster.launch import hydra_quoted

    pinned = [o for o in overrides if not o.startswith("output_dir=")] + [f"output_dir={hydra_quoted(str(run_dir))}"]
    assert argv[-len(pinned):] == pinned and prepare_argv[-len(pinned):] == pinned
    assert f"cd {cwd}" not in (run_dir / "job.sbatch").read_text()  # quoted


def test_deepspeed_hostfile_launch_passes_hostile_overrides_intact(tmp_path):
    """DeepSpeed's pdsh runner hands the arguments to each host's shell as one command line; a stand-in pdsh
    runs that line with bash (as ssh does), with python recording its arguments instead of training."""
    from sftdist.cluster.launch import launcher_command

    overrides, _ = hostile_overrides(tmp_path)
    overrides += ["model.name_or_path=a\\\"b c", "x=line1\nline2"]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "pdsh").write_text(
        "#!/bin/bash\nwhile [[ $1 == -* ]]; do case $1 in -S) shift ;; *) shift 2 ;; esac; done\ncmd=\"$*\"\n"
        f"bash -c \"{sys.executable}() {{ printf '%s\\\\0' \\\"\\$@\\\" > {tmp_path}/remote.argv; }}; ${{cmd//%n/0}}\"\n")
    (bin_dir / "ssh").write_text("#!/bin/bash\necho node1\n")  # DeepSpeed's reachability check
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    (tmp_path / "hosts").write_text("node1 slots=1\n")  # one host: --force_multi keeps the pdsh path
    cmd = launcher_command(LaunchConfig(launcher="deepspeed", hostfile=str(tmp_path / "hosts"), master_addr="node1"),
                           overrides, nproc=1)
    run_cmd(cmd, env={"PATH": f"{bin_dir}:{os.environ['PATH']}"})
    remote = (tmp_path / "remote.argv").read_text().split("\0")[:-1]
    assert not list(tmp_path.glob("pwned*"))
    assert remote[remote.index("sftdist.train") + 1:] == overrides


# --- 5. the data stage writes only into its cache ---------------------------------------------------------


def test_data_stage_never_writes_beside_the_data(tmp_path):
    """A read-only data folder (JSON Lines, Parquet, a symlink to a file elsewhere, a symlinked folder) and a
    CSV folder: sftdist-prepare reads them, writes only under data.cache_dir and $SFTDIST_CACHE, and leaves
    both the folders and the HF datasets cache untouched."""
    import pandas as pd

    from sftdist.data.demo import resolve_builtin

    rows = [json.loads(line) for line in Path(resolve_builtin("builtin:demo_chat")).read_text().splitlines()][:70]
    data, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    for d in (data / "chat", data / "pc", elsewhere / "folder"):
        d.mkdir(parents=True)
    (data / "chat" / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:30]))
    pd.DataFrame({"messages": [r["messages"] for r in rows[30:50]]}).to_parquet(data / "chat" / "b.parquet")
    (elsewhere / "linked.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[50:60]))
    (elsewhere / "folder" / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[60:70]))
    (data / "chat" / "link.jsonl").symlink_to(elsewhere / "linked.jsonl")
    (data / "chat" / "sub").symlink_to(elsewhere / "folder")
    pd.DataFrame([{"prompt": r["messages"][-2]["content"], "completion": r["messages"][-1]["content"]}
                  for r in rows]).to_csv(data / "pc" / "p.csv", index=False)
    subprocess.run(["chmod", "-R", "a-w", str(data), str(elsewhere)], check=True)
    before = (tree(data), tree(elsewhere))
    try:
        proc = run_cmd([str(Path(sys.executable).with_name("sftdist-prepare")), f"data.sources.0.path={data / 'chat'}",
                        "data.sources.0.eval_fraction=0", f"data.sources.1.path={data / 'pc'}",
                        "data.sources.1.format=prompt_completion", "data.sources.1.eval_fraction=0",
                        f"data.cache_dir={tmp_path / 'cache'}", "train.max_length=96"],
                       env={"SFTDIST_CACHE": str(tmp_path / "sftdist_cache"), "HF_DATASETS_CACHE": str(tmp_path / "hf")})
    finally:
        subprocess.run(["chmod", "-R", "u+w", str(data), str(elsewhere)], check=True)
    assert (tree(data), tree(elsewhere)) == before
    assert "demo_chat: 60/60 records" in proc.stdout  # the linked file is read, the linked folder is not
    assert "demo_generic: 70/70 records" in proc.stdout
    assert not (tmp_path / "hf").exists()  # no Arrow copy of the Parquet/CSV files in the HF datasets cache
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "data", "elsewhere", "sftdist_cache"]
