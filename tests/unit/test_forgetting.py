"""The forgetting probe's parts on a tiny random model (the real-model behaviour is tests/smoke/test_real_model.py):
the base record, the drift measures, LoRA's base with its adapter disabled, the record's trip through the
checkpoint's eval state, the probe file's errors, and the learning-rate defaults and warnings beside them."""

from __future__ import annotations

import doctest
import json

import pytest
import torch

from sftdist.config import EarlyStoppingConfig
from sftdist.data.messages import DataError
from sftdist.data.probes import probe_conversations
from sftdist.observe.evaluation import EvalTracker
from sftdist.observe.forgetting import ForgettingProbe, prompt_ids
from sftdist.observe.samples import stop_token_ids


def test_module_examples():
    import sftdist.config.schema
    import sftdist.data.probes
    import sftdist.observe.advice
    import sftdist.observe.forgetting

    for module in (sftdist.observe.forgetting, sftdist.data.probes, sftdist.config.schema, sftdist.observe.advice):
        result = doctest.testmod(module)
        assert result.attempted > 0 and result.failed == 0, module.__name__


@pytest.fixture(scope="module")
def tiny(demo_tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = demo_tokenizer
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    return model.eval(), tokenizer


def make_probe(tokenizer, n: int = 4) -> ForgettingProbe:
    conversations = probe_conversations("builtin", pretrained=False)[:n]
    return ForgettingProbe([prompt_ids(tokenizer, c) for c in conversations], [c[-1]["content"] for c in conversations],
                           tokenizer, stop_token_ids(tokenizer), max_new_tokens=8, min_agreement=0.8,
                           synced=False)


def test_an_unchanged_model_has_no_drift_and_a_changed_one_has_some(tiny):
    model, tokenizer = tiny
    probe = make_probe(tokenizer)
    assert probe.run(model, 0, lora=False) == ({"forgetting/kl": 0.0, "forgetting/answer_agreement": 1.0}, [], None)
    assert len(probe.base) == 4 and all(len(b.top_ids) == len(b.answer_ids) > 0 for b in probe.base)
    same, rows, warning = probe.measure(model, 1)
    assert same["forgetting/answer_agreement"] == 1.0 and same["forgetting/kl"] < 1e-5 and warning is None
    assert [r["agrees"] for r in rows] == [True] * 4 and rows[0]["base_answer"] == rows[0]["answer"]
    probe.base[1].text = "Something else entirely."  # another wording the model finds as likely: kept
    reworded, rows, _ = probe.measure(model, 2)
    assert reworded["forgetting/answer_agreement"] == 1.0 and rows[1]["answer"] != rows[1]["base_answer"]
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.5)
        moved, rows, warning = probe.measure(model, 7)
    finally:
        model.load_state_dict(saved)
    assert moved["forgetting/kl"] > 0.1 and moved["forgetting/answer_agreement"] < 0.8
    worst = max(rows, key=lambda r: r["kl"])
    assert warning.startswith("warning: the model is forgetting: after step 7") and f"{worst['prompt']!r}: before" in warning


def test_lora_base_is_the_model_with_its_adapter_disabled(tiny):
    from peft import LoraConfig, get_peft_model

    model, tokenizer = tiny
    plain = make_probe(tokenizer, n=2)
    plain.record_base(model)
    import copy

    tuned = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # an adapter that changes the model
    lora = make_probe(tokenizer, n=2)
    lora.run(tuned, 3, lora=True)  # a resume without a base record: made with the adapter off
    assert [b.answer_ids for b in lora.base] == [b.answer_ids for b in plain.base]
    assert torch.allclose(torch.tensor(lora.base[0].top_logp), torch.tensor(plain.base[0].top_logp), atol=1e-5)
    assert plain.measure(tuned, 3)[0]["forgetting/kl"] > 1e-3  # and the adapter on does drift


def test_a_full_fine_tune_resumed_without_a_record_says_so_once(tiny):
    model, tokenizer = tiny
    probe = make_probe(tokenizer, n=1)
    metrics, rows, note = probe.run(model, 5, lora=False)
    assert (metrics, rows) == ({}, []) and "forgetting/* is not reported" in note
    assert probe.run(model, 10, lora=False) == ({}, [], None)


def test_the_record_travels_in_the_eval_state_of_a_checkpoint(tiny):
    model, tokenizer = tiny
    probe = make_probe(tokenizer, n=2)
    probe.record_base(model)
    tracker = EvalTracker(EarlyStoppingConfig(), probe_base=probe.state())
    state = json.loads(json.dumps(tracker.state()))  # as trainer_state.json keeps it
    resumed = make_probe(tokenizer, n=2)
    resumed.load_state(EvalTracker.from_state(EarlyStoppingConfig(), state).probe_base)
    assert resumed.base == probe.base
    other = make_probe(tokenizer, n=3)  # other prompts: the record does not apply
    other.load_state(state["forgetting_probe"])
    assert other.base is None
    assert "forgetting_probe" not in EvalTracker(EarlyStoppingConfig()).state()


def test_a_probe_file_of_prompts_and_its_errors(tmp_path):
    good = tmp_path / "probes.jsonl"
    good.write_text(json.dumps({"prompt": "What is 2+2?"}) + "\n" + json.dumps(
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]}) + "\n")
    assert probe_conversations(str(good), pretrained=True)[1][0] == {"role": "system", "content": "Be brief."}
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"instruction": "Hi"}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl.*line 2.*a probe needs \"prompt\".*\['instruction'\]"):
        probe_conversations(str(bad), pretrained=True)
    with pytest.raises(DataError, match=r"data.forgetting_probe=.*missing.jsonl"):
        probe_conversations(str(tmp_path / "missing.jsonl"), pretrained=True)
    assert probe_conversations("none", pretrained=True) == []
