"""Checkpoints resume exactly: a run stopped after step 3 and resumed gives bit-identical losses and
weights to the uninterrupted run (fp32 on CPU), for ZeRO-2 and ZeRO-3, full and LoRA; checkpoints are
atomic and pruned; earlier runs are never silently replaced. (Other world sizes: tests/dist.)"""

import json
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import FAST, read_metrics, run_cmd, train_single, train_torchrun

SIX = [*FAST, "train.max_steps=6", "train.lr=1e-2"]
# The forgetting probe's base record travels in the checkpoint: a resumed run measures against the same base
PROBE = ["data.forgetting_probe=builtin", "data.forgetting_probe_max_new_tokens=8"]
CASES = {  # name: (processes, overrides)
    "zero2_full": (1, ["parallelism=zero2"]),
    "zero3_full": (2, ["parallelism=zero3", *PROBE]),
    "zero2_lora": (1, ["parallelism=zero2", "peft=lora", "peft.dropout=0.1", *PROBE]),
    "zero3_lora": (2, ["parallelism=zero3", "peft=lora", "peft.dropout=0.1"]),
}


def train(nproc, args, **kw):
    return train_single(args, **kw) if nproc == 1 else train_torchrun(nproc, args, **kw)


def final_weights(run_dir):
    final = run_dir / "final"
    return load_file(final / ("adapter_model.safetensors" if (final / "adapter_config.json").exists()
                              else "model.safetensors"))


@pytest.mark.parametrize("case", sorted(CASES))
def test_stopped_and_resumed_equals_uninterrupted(tmp_path, case):
    nproc, overrides = CASES[case]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    train(nproc, [*SIX, *overrides, f"output_dir={whole}"])
    first = train(nproc, [*SIX, *overrides, "train.stop_at_step=3", f"output_dir={parts}"])
    assert "stopped after step 3 of 6" in first.stdout and not (parts / "final").exists()
    assert (parts / "checkpoints" / "latest").read_text().strip() == "step-3"
    if case == "zero2_full":  # another ZeRO stage cannot load it: one line, before any work, nothing rewritten (#5)
        before = {f: (parts / f).read_text() for f in ("config.yaml", "metrics.jsonl")}
        other = train(nproc, [*SIX, "parallelism=zero3", f"output_dir={parts}"], check=False)
        assert other.returncode == 1 and "parallelism.zero_stage: 2 -> 3" in other.stderr, other.stderr
        assert "Traceback" not in other.stderr and "tokenis" not in other.stdout
        assert before == {f: (parts / f).read_text() for f in before}
    second = train(nproc, [*SIX, *overrides, f"output_dir={parts}"])  # same command: resume=auto
    assert "resumed from" in second.stdout and "after step 3" in second.stdout
    got, want = read_metrics(parts), read_metrics(whole)
    assert [r["step"] for r in got] == list(range(1, 7))  # one uninterrupted-looking history
    assert [r["loss"] for r in got] == [r["loss"] for r in want]  # bit for bit
    assert [r["lr"] for r in got] == [r["lr"] for r in want]
    if PROBE[0] in overrides:
        keys = ("forgetting/kl", "forgetting/answer_agreement")
        assert [got[-1][k] for k in keys] == [want[-1][k] for k in keys] and got[-1]["forgetting/kl"] > 0
        saved = json.loads((parts / "checkpoints" / "step-3" / "trainer_state.json").read_text())
        assert len(saved["eval"]["forgetting_probe"]["answers"]) == 16 and "no forgetting probe" not in second.stdout
    a, b = final_weights(parts), final_weights(whole)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if "lora" in case:  # the adapter holds trained values, not empty ZeRO-3 placeholders
        assert all(v.numel() > 1 and v.abs().sum() > 0 for k, v in a.items() if "lora_B" in k)
        # Base + saved adapter, loaded with peft in one process, reproduces the engine's final eval loss.
        from peft import PeftModel
        from transformers import AutoTokenizer

        from sftdist.config import compose_config
        from sftdist.engine.model import build_model
        from tests.smoke.test_train_cpu import eval_loss_of_export

        cfg = compose_config([*SIX, *overrides])
        base = build_model(cfg.model, AutoTokenizer.from_pretrained(parts / "final"), precision="fp32",
                           activation_checkpointing=False, seed=cfg.train.seed)
        adapted = PeftModel.from_pretrained(base, parts / "final")
        assert eval_loss_of_export(parts / "final", [*SIX, *overrides], adapted) == pytest.approx(
            got[-1]["eval_loss"], rel=1e-5)


def test_save_every_keeps_last_and_refusals(tmp_path):
    run_dir = tmp_path / "run"
    train(1, [*SIX, "train.save_every=1", "train.keep_last=2", "train.stop_at_step=5", f"output_dir={run_dir}"])
    ckpts = run_dir / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir() if p.name.startswith("step-")) == ["step-4", "step-5"]
    assert (ckpts / "latest").read_text().strip() == "step-5"
    # A crash during a later save leaves a .tmp directory: it is ignored and the latest complete one is used.
    (ckpts / "step-6.tmp").mkdir()
    proc = train(1, [*SIX, "train.resume=never", f"output_dir={run_dir}"], check=False)
    assert proc.returncode != 0 and "already holds a run" in proc.stderr
    proc = train(1, [*SIX, f"output_dir={run_dir}"])
    assert "resumed from" in proc.stdout and "step-5 after step 5" in proc.stdout
    assert (run_dir / "final").exists() and not (ckpts / "step-6.tmp").exists()  # cleaned up on start
    proc = train(1, [*SIX, f"output_dir={run_dir}"], check=False)
    assert proc.returncode != 0 and "already holds a finished run" in proc.stderr


def test_lora_adapter_loads_with_peft_and_merges(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sftdist.config import compose_config
    from sftdist.engine.model import build_model

    run_dir = tmp_path / "lora"
    train(1, [*SIX, "peft=lora", "peft.merge_on_save=true", f"output_dir={run_dir}"])
    cfg = compose_config([])
    tok = AutoTokenizer.from_pretrained(run_dir / "final")
    base = build_model(cfg.model, tok, precision="fp32", activation_checkpointing=False, seed=cfg.train.seed)
    adapted = PeftModel.from_pretrained(base, run_dir / "final").eval()
    merged = AutoModelForCausalLM.from_pretrained(run_dir / "final_merged").eval()
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 2 plus 2?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(adapted(ids).logits, merged(ids).logits, rtol=1e-4, atol=1e-4)
    # sftdist-export writes the same merged model from the run directory alone.
    proc = run_cmd([sys.executable, "-m", "sftdist", "export", "--merge", str(run_dir)])
    assert "final_merged" in proc.stdout


@pytest.mark.parametrize("stage,extra", [("zero0", ["peft.use_dora=true"]), ("zero1", ["peft.use_rslora=true"]),
                                         ("zero3_offload", [])])
def test_lora_under_other_stages(tmp_path, stage, extra):
    run_dir = tmp_path / stage
    proc = train(1, [*FAST, f"parallelism={stage}", "peft=lora", "train.lr=1e-2", *extra, f"output_dir={run_dir}"])
    assert f"ZeRO-{stage[4]}" in proc.stdout
    adapter = final_weights(run_dir)
    assert all(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)
    config = json.loads((run_dir / "final" / "adapter_config.json").read_text())
    assert config["use_dora"] == ("peft.use_dora=true" in extra)
    assert config["use_rslora"] == ("peft.use_rslora=true" in extra)
    if "peft.use_dora=true" in extra:
        assert any("lora_magnitude_vector" in k for k in adapter)
