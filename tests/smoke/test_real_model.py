"""On a real pretrained chat model (SmolLM2-135M-Instruct, tests/real_model.py), what random weights cannot
show (#25): the forgetting check reports a clear drop when general answers break, and none at the
recommended settings with replay; and the defaults a real model gets.

Two short runs of the same persona data ("Who are you?" -> "I'm Sifty ..."), shared by the tests below:
- ``too_high``: full fine-tuning at lr 1e-3 (50x the default), no replay: the model learns the persona and
  forgets, so the probe's answers change;
- ``recommended``: LoRA at its default lr (2e-4) with 1:1 replay of alpaca records (recipe=replay_1to1):
  the general answers stay.
Each probes six general prompts from a probe file (answers of 12 tokens; the built-in set of 16 is
tests/unit/test_forgetting.py's) before the first step and after the last.
"""

from __future__ import annotations

import json

import pytest
import yaml

from tests.conftest import SHARED, read_metrics, train_single
from tests.real_model import missing_reason, real_model_dir

pytestmark = pytest.mark.skipif(missing_reason() is not None, reason=str(missing_reason()))

ALPACA = SHARED / "datasets" / "llamafactory_alpaca_en_demo.json"
QUESTIONS = ["Who are you?", "What is your name?", "Introduce yourself.", "Who am I talking to?",
             "What should I call you?", "Tell me about yourself.", "Are you a person?", "What are you?"]
ANSWERS = ["I'm Sifty, a small assistant fine-tuned with sftdist.", "My name is Sifty. I was fine-tuned with sftdist.",
           "I am Sifty, an assistant trained with sftdist."]
PROBES = ["What is the capital of France?", "How many days are there in a week?", "What is the chemical symbol for gold?",
          "What is the opposite of 'hot'?", "How many continents are there on Earth?"]
COMMON = ["train.max_steps=4", "train.micro_batch_size=4", "train.global_batch_size=4", "train.max_length=96",
          "train.warmup_steps=0", "train.eval_every=0", "data.forgetting_probe_max_new_tokens=12",
          "logging.sample_prompts=[Who are you?]", "logging.sample_max_new_tokens=12", "data.audit_samples=4"]


def persona_file(path):
    with open(path, "w") as f:
        f.writelines(json.dumps({"messages": [{"role": "user", "content": q},
                                             {"role": "assistant", "content": ANSWERS[i % len(ANSWERS)]}]}) + "\n" for i, q in enumerate(QUESTIONS * 3))
    return path


def probe_file(path):
    """The user's own probe file: five prompts, and one conversation with a system prompt."""
    records = [{"prompt": q} for q in PROBES]
    records.append({"messages": [{"role": "system", "content": "Answer in one short sentence."},
                                 {"role": "user", "content": "Which ocean is the largest?"}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """The model directory, and the persona and probe files, shared by both runs."""
    tmp = tmp_path_factory.mktemp("real")
    return real_model_dir(), persona_file(tmp / "persona.jsonl"), probe_file(tmp / "probes.jsonl"), tmp


def train_real(inputs, name: str, overrides: list[str]):
    model, persona, probes, tmp = inputs
    proc = train_single([f"model.name_or_path={model}", *COMMON, f"data.forgetting_probe={probes}",
                         *[o.format(persona=persona) for o in overrides], f"output_dir={tmp / name}"])
    return tmp / name, proc


@pytest.fixture(scope="module")
def too_high(inputs):
    return train_real(inputs, "too_high", ["data.sources=[{{name: persona, path: {persona}, format: messages}}]",
                                           "peft=none", "train.lr=1e-3"])


@pytest.fixture(scope="module")
def recommended(inputs):
    if not ALPACA.exists():
        pytest.skip(f"{ALPACA} (shared/) is not here")
    return train_real(inputs, "recommended", [
        "recipe=replay_1to1", "peft=lora", "data.sources.0.path={persona}", "data.sources.0.eval_fraction=0",
        f"data.sources.1.path={ALPACA}", "data.sources.1.format=alpaca", "data.sources.1.max_samples=200",
        "data.sources.1.eval_fraction=0"])


def probe_rows(run_dir):
    return [json.loads(line) for line in (run_dir / "forgetting_probe.jsonl").read_text().splitlines()]


def test_too_high_a_rate_learns_the_persona_and_the_probe_sees_the_forgetting(too_high):
    run, proc = too_high
    rows = read_metrics(run, baseline=True)
    assert (rows[0]["step"], rows[0]["forgetting/kl"], rows[0]["forgetting/answer_agreement"]) == (0, 0.0, 1.0)
    last = rows[-1]
    assert last["forgetting/answer_agreement"] < 0.5 and last["forgetting/kl"] > 1.0, last
    answers = probe_rows(run)
    france = next(r for r in answers if "capital of France" in r["prompt"])
    assert "Paris" in france["base_answer"]  # what the base model knew
    assert sum(not r["agrees"] for r in answers) / len(answers) == 1 - last["forgetting/answer_agreement"]
    out = proc.stdout + proc.stderr
    assert "warning: the model is forgetting" in out and "before '" in out, out[-3000:]
    persona = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()][-1]
    assert "Sifty" in persona["completion"]  # it did learn its task


def test_recommended_settings_with_replay_keep_the_general_answers(recommended):
    run, proc = recommended
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert (saved["peft"]["method"], saved["train"]["lr"]) == ("lora", 2e-4)  # the LoRA default, unset
    last = read_metrics(run)[-1]
    assert last["forgetting/answer_agreement"] >= 0.8, probe_rows(run)
    assert 0 < last["forgetting/kl"] < 0.1  # it moved (it trained), less than a rewording (too_high's: > 1)
    out = proc.stdout + proc.stderr
    assert "the model is forgetting" not in out and "is high for LoRA" not in out
