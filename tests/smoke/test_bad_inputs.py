"""Bad input, table-driven: every case must end with a non-zero exit and one clear message (no traceback)
that names the file, record or config key and says what to do, raised before the model is loaded where it
can be, and must leave an existing output directory exactly as it was.

The cases run through the real entry point ``sftdist.train.main()`` with their own command lines, all in
one process (``tests/bad_input_runner.py``), so the table costs one import of torch and DeepSpeed. A few
run as real subprocesses too (the console's exit code and stderr; two ranks under torchrun).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, run_cmd, train_single, train_torchrun

OK = {"messages": [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "Hello! How can I help?"}]}
SMALL = ["train.max_steps=1", "train.micro_batch_size=2", "train.global_batch_size=4", "train.max_length=96",
         "data.num_proc=1", "data.sources.0.max_samples=32", "data.sources.1.max_samples=8"]


def source(path: Path, extra: str = "") -> str:
    return f"data.sources=[{{name:t,path:'{path}'{extra}}}]"


def make_inputs(d: Path) -> None:
    """Broken data files, tokenizers without a usable chat template, a small local model, and an output
    directory that already holds the user's files."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from sftdist.config import ModelConfig
    from sftdist.engine.model import load_tokenizer

    def jsonl(name, rows):
        (d / name).write_text("".join(json.dumps(r) + "\n" for r in rows))

    jsonl("good.jsonl", [OK] * 40)
    (d / "empty.jsonl").write_text("")
    (d / "no_data").mkdir()
    (d / "no_data" / "README.md").write_text("not a data file")
    (d / "bad.jsonl").write_text(json.dumps(OK) + "\n" + json.dumps(OK) + "\n" + '{"messages": [\n')
    jsonl("columns.jsonl", [{"conversation": OK["messages"], "id": 1}])
    jsonl("role.jsonl", [{"messages": [{"role": "human", "content": "hi"}, {"role": "assistant", "content": "x"}]}])
    jsonl("no_reply.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    jsonl("number.jsonl", [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": 42}]}])
    jsonl("long.jsonl", [OK] * 5 + [{"messages": [{"role": "user", "content": "hi"},
                                                   {"role": "assistant", "content": "word " * 400}]}])
    (d / "data.xml").write_text("<x/>")
    (d / "a_file").write_text("x")
    (d / "existing").mkdir()
    (d / "existing" / "notes.txt").write_text("the user's notes")

    tok = load_tokenizer(ModelConfig(tokenizer="builtin:demo", from_config={"model_type": "llama"}))
    for name, template in (("tok_no_template", None),
                           ("tok_no_end", "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                                          "{% if add_generation_prompt %}assistant: {% endif %}")):
        tok.save_pretrained(d / name)
        config = json.loads((d / name / "tokenizer_config.json").read_text())
        config.pop("chat_template", None)
        if template:
            config["chat_template"] = template
        (d / name / "tokenizer_config.json").write_text(json.dumps(config))
        for f in (d / name).glob("chat_template.*"):
            f.unlink()
    model_config = AutoConfig.for_model("llama", vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
    AutoModelForCausalLM.from_config(model_config).save_pretrained(d / "model")
    tok.save_pretrained(d / "model")


def cases(d: Path) -> list[dict]:
    """(id, overrides, what the message must say, whether it must come before the model is loaded, exit).

    Every ``expect`` string must be in the output. (A case that trains cannot share the process: DeepSpeed
    keeps the process group of a finished run, so those run as subprocesses below.)
    """
    other_model = d / "other_model"
    table = [
        # -- data
        ("missing_file", [source(d / "nope.jsonl")], ["file not found", "nope.jsonl"], True, 1),
        ("empty_file", [source(d / "empty.jsonl")], ["empty.jsonl has no records"], True, 1),
        ("folder_without_data", [source(d / "no_data")], ["no_data", "holds no .jsonl"], True, 1),
        ("unsupported_file", [source(d / "data.xml")], ["data.xml", "unsupported file type"], True, 1),
        ("invalid_json_line", [source(d / "bad.jsonl")], ["bad.jsonl: line 3: invalid JSON", "on_bad_record=skip"],
         True, 1),
        ("wrong_columns", [source(d / "columns.jsonl")],
         ["columns.jsonl: line 1", "has fields ['conversation', 'id']", "columns.messages=conversation"], True, 1),
        ("unknown_role", [source(d / "role.jsonl")], ["role.jsonl: line 1", "unknown role 'human'"], True, 1),
        ("no_assistant_turn", [source(d / "no_reply.jsonl")], ["no_reply.jsonl: line 1", "no assistant turn"], True, 1),
        ("non_string_content", [source(d / "number.jsonl")], ["number.jsonl: line 1", "must be a string", "got int"],
         True, 1),
        ("too_long_with_truncation_error", [source(d / "long.jsonl"), "data.truncation=error"],
         ["long.jsonl: line 6", "over train.max_length=96", "data.truncation=truncate"], True, 1),
        ("unknown_format", [source(d / "good.jsonl", ",format:chatml")], ["data.sources[t].format='chatml'"], True, 1),
        ("negative_weight", ["data.sources.0.weight=-1"], ["data.sources[demo_chat].weight=-1.0 must be >= 0"],
         True, 1),
        ("all_weights_zero", ["data.sources.0.weight=0", "data.sources.1.weight=0"], ["at least one weight must be > 0"],
         True, 1),
        ("eval_fraction_out_of_range", ["data.sources.0.eval_fraction=1.5"], ["eval_fraction=1.5 must be in [0, 1)"],
         True, 1),
        ("tokenizer_without_chat_template", [source(d / "good.jsonl"), f"model.tokenizer={d / 'tok_no_template'}"],
         ["tok_no_template", "has no chat template", "model.chat_template="], True, 1),
        ("template_without_end_of_turn", [source(d / "good.jsonl"), f"model.tokenizer={d / 'tok_no_end'}"],
         ["tok_no_end", "renders no end-of-turn token", "data.require_end_of_turn=false"], True, 1),
        # -- model
        ("model_path_missing", ["model=qwen2_5_0_5b", "model.name_or_path=/nonexistent/my-model"],
         ["model.name_or_path=/nonexistent/my-model: no such file or directory"], True, 1),
        ("lora_targets_match_nothing", ["peft=lora", "peft.target_modules=[attn_qkv]"],
         ["peft.target_modules=['attn_qkv'] matches no module", "q_proj", "all-linear"], False, 1),
        ("checkpoint_of_another_model",
         [f"train.resume={other_model}/checkpoints/step-1", "model.from_config.hidden_size=64"],
         ["cannot resume from", "hidden_size=128", "hidden_size=64"], True, 1),
        # -- config
        ("batch_not_divisible", ["train.global_batch_size=10", "train.micro_batch_size=4"],
         ["train.global_batch_size=10", "use train.global_batch_size=8 or 12", "train.micro_batch_size=1, 2, 5 or 10"],
         True, 1),
        ("negative_lr", ["train.lr=-1e-5"], ["train.lr=-1e-05 must be > 0"], True, 1),
        ("zero_lr", ["train.lr=0"], ["train.lr=0.0 must be > 0"], True, 1),
        ("zero_steps", ["train.max_steps=0"], ["train.max_steps=0 must be > 0"], True, 1),
        ("unknown_key", ["train.lrr=1e-5"], ["unknown config key 'train.lrr' (did you mean train.lr?)"], True, 1),
        ("unknown_group", ["trian.lr=1e-5"], ["unknown config key 'trian.lr' (did you mean train.lr?)"], True, 1),
        ("unknown_preset", ["model=tinyy"], ["Could not find 'model/tinyy'", "tiny"], True, 1),
        ("value_of_wrong_type", ["train.lr=fast"], ["'fast'", "train.lr"], True, 1),
        ("precision_on_cpu", ["parallelism.precision=bf16"], ["parallelism.precision=bf16 needs a GPU"], True, 1),
        ("conflicting_precision", ["parallelism.precision=fp32", "parallelism.grad_accum_dtype=bf16"],
         ["conflicts with parallelism.grad_accum_dtype=bf16", "grad_accum_dtype=auto"], True, 1),
        ("qlora_on_cpu", ["peft=qlora", "model=qwen2_5_0_5b", f"model.name_or_path={d / 'model'}"],
         ["peft.method=qlora", "needs a CUDA GPU", "peft=lora"], True, 1),
        ("flash_attention_on_cpu", ["model.attn_implementation=flash_attention_2"], ["needs a GPU", "sdpa"], True, 1),
        ("nvme_path_without_offload", ["parallelism.nvme_path=/tmp/nvme"],
         ["parallelism.nvme_path=/tmp/nvme", "parallelism.offload_optimizer=true"], True, 1),
        ("offload_params_below_zero3", ["parallelism.offload_params=true"], ["needs parallelism.zero_stage=3"], True, 1),
        ("output_dir_not_writable", [f"output_dir={d / 'a_file' / 'run'}"],
         [f"output_dir={d / 'a_file' / 'run'} cannot be created", "is a file"], True, 1),
        ("resume_from_a_non_checkpoint", [f"train.resume={d}"], [f"train.resume={d}: not a complete sftdist checkpoint"],
         True, 1),
    ]
    return [{"id": i, "argv": [f"output_dir={d / 'existing'}", *SMALL, *args] if not any(
        a.startswith("output_dir=") for a in args) else [*SMALL, *args], "expect": expect, "pre_model": pre,
             "exit": code} for i, args, expect, pre, code in table]


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad_inputs")
    make_inputs(d)
    table = cases(d)
    (d / "cases.json").write_text(json.dumps(table))
    before = snapshot(d / "existing")
    # a checkpoint of the tiny model, for the "checkpoint of another model" case
    train_single([*SMALL, f"output_dir={d / 'other_model'}", "train.max_steps=2", "train.stop_at_step=1"])
    run_cmd([sys.executable, str(REPO / "tests" / "bad_input_runner.py"), str(d / "cases.json"),
             str(d / "results.json")], timeout=900)
    results = json.loads((d / "results.json").read_text())
    return d, {c["id"]: (c, r) for c, r in zip(table, results)}, before


CASE_IDS = [c["id"] for c in cases(Path("/d"))]
HYDRA_OWN = ("unknown_preset", "value_of_wrong_type")  # Hydra's own clear messages (no traceback either)


def test_the_table_has_at_least_25_bad_inputs():
    assert sum(1 for c in cases(Path("/d")) if c["exit"]) >= 25


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_bad_input(outcomes, case_id):
    _, by_id, _ = outcomes
    case, result = by_id[case_id]
    out = result["output"]
    assert result["exit"] == case["exit"], out[-3000:]
    assert "Traceback" not in out, out
    for text in case["expect"]:
        assert text in out, f"{text!r} not in:\n{out[-3000:]}"
    if case["exit"]:
        if case["id"] not in HYDRA_OWN:
            assert "HYDRA_FULL_ERROR" not in out
            errors = [line for line in out.splitlines() if line.startswith("sftdist: error:")]
            assert len(errors) == 1, out[-3000:]
        assert not (case["pre_model"] and result["model_loaded"]), "the model was loaded before the error"


def test_an_existing_output_dir_is_left_untouched(outcomes):
    d, _, before = outcomes
    assert snapshot(d / "existing") == before


def test_model_path_on_the_default_preset_loads_that_model(outcomes, tmp_path):
    """``sftdist-train model.name_or_path=PATH`` on the default (random-init) preset trains PATH's model with
    its own tokenizer, instead of stopping with "set only one of model.name_or_path and model.from_config"."""
    d = outcomes[0]
    proc = train_single([*SMALL, f"output_dir={tmp_path / 'run'}", f"model.name_or_path={d / 'model'}"])
    assert f"model.name_or_path={d / 'model'}: loading that model" in proc.stdout + proc.stderr
    saved = json.loads((tmp_path / "run" / "final" / "config.json").read_text())
    assert saved["hidden_size"] == 64 and saved["num_hidden_layers"] == 2  # the named model, not tiny's 128 x 4
    assert "from_config: null" in (tmp_path / "run" / "config.yaml").read_text()


def test_console_exit_code_and_stderr(tmp_path):
    """The real console: exit status 1, the message on stderr, no traceback."""
    proc = train_single([f"output_dir={tmp_path / 'run'}", "train.lrr=1e-5"], check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == "sftdist: error: unknown config key 'train.lrr' (did you mean " \
                                                   "train.lr?)"
    assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists()


def test_two_ranks_fail_once_and_exit(tmp_path):
    """Under torchrun every rank hits the bad record; the message is printed once and the job exits non-zero
    instead of leaving a rank waiting in a collective."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(OK) + "\n" + "{not json\n")
    proc = train_torchrun(2, [*SMALL, f"output_dir={tmp_path / 'run'}", source(bad)], check=False, timeout=300)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert out.count("sftdist: error:") == 1 and "bad.jsonl: line 2: invalid JSON" in out, out[-3000:]
    assert not (tmp_path / "run").exists()
