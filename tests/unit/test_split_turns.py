"""``data.split_turns``: a conversation that the chat template renders otherwise than at inference becomes one
sample per trained reply, each exact (the audit's rules) and each what the model meets at inference.

The first tests use the demo tokenizer with small templates written here (no ../shared needed): one that
keeps a reasoning field only on the final reply, one that drops a reply's reasoning on every turn and opens
``<think>`` in its generation prompt (DeepSeek-R1's way). The rest run on every real template in
../shared/chat_templates, with real vocabularies.
"""

from __future__ import annotations

import copy
import functools
import json

import pytest

from sftdist.config import ConfigError, DataConfig, DataSource
from sftdist.data.audit import check_record, template_warnings
from sftdist.data.build import build_datasets, mix_report, split_note
from sftdist.data.loader import SampleSchedule
from sftdist.data.mask_rules import check_built_sample, check_history, check_masks
from sftdist.data.messages import DataError, to_conversation
from sftdist.data.prepare import cache_key
from sftdist.data.split_turns import encode_samples, history_rewrites, split_views, turn_messages
from sftdist.data.tokenize import encode_conversation, trained_turns
from tests.unit.test_chat_templates import SHARED, TEMPLATES, template_tokenizer

# Renders a reply's reasoning_content only when the reply ends the conversation (as Qwen3 does for replies
# before the last user message).
FIELD_ON_LAST = (
    "{%- for m in messages %}{{- '<|im_start|>' + m['role'] + '\\n' }}"
    "{%- if m['role'] == 'assistant' and loop.last and m.reasoning_content %}"
    "{{- '<think>\\n' + m.reasoning_content + '\\n</think>\\n\\n' }}{%- endif %}"
    "{{- m['content'] + '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# Drops the reasoning in every reply's content, the last one too, and opens <think> in the generation prompt.
DROPS_ALWAYS = (
    "{%- for m in messages %}{%- set c = m['content'] %}"
    "{%- if m['role'] == 'assistant' and '</think>' in c %}{%- set c = c.split('</think>')[-1].lstrip() %}{%- endif %}"
    "{{- '<|im_start|>' + m['role'] + '\\n' + c + '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n<think>\\n' }}{%- endif %}"
)
# Qwen3.5's way: drops earlier reasoning, and its generation prompt ends with the "<think>\n" a final reply opens.
OPENS_THINK = (
    "{%- for m in messages %}{%- set c = m['content'] %}"
    "{%- if m['role'] == 'assistant' and not loop.last and '</think>' in c %}"
    "{%- set c = c.split('</think>')[-1].lstrip() %}{%- endif %}"
    "{{- '<|im_start|>' + m['role'] + '\\n' + c + '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n<think>\\n' }}{%- endif %}"
)
# DeepSeek-V3.1's non-thinking way: every reply rendered after a closed "</think>", reasoning dropped, and a
# generation prompt that closes the thinking block too: there is no room for reasoning at inference.
CLOSES_THINK = (
    "{%- for m in messages %}{%- set c = m['content'] %}"
    "{%- if m['role'] == 'assistant' %}{%- set c = '</think>' + c.split('</think>')[-1].lstrip() %}{%- endif %}"
    "{{- '<|im_start|>' + m['role'] + '\\n' + c + '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n</think>' }}{%- endif %}"
)
CHAT = [{"role": "user", "content": "What is 17 times 3?"},
        {"role": "assistant", "content": "<think>\n17 * 3 = 51.\n</think>\n\n17 times 3 is 51."},
        {"role": "user", "content": "And 51 plus 9?"},
        {"role": "assistant", "content": "<think>\n51 + 9 = 60.\n</think>\n\nThat makes 60."}]
FIELD_CHAT = [{"role": "user", "content": "What is 17 times 3?"},
              {"role": "assistant", "content": "17 times 3 is 51.", "reasoning_content": "17 * 3 = 51."},
              {"role": "user", "content": "And 51 plus 9?"},
              {"role": "assistant", "content": "That makes 60.", "reasoning_content": "51 + 9 = 60."}]
SYSTEM_CHAT = [{"role": "system", "content": "You are a careful calculator."}, *CHAT]


def trained_text(tok, enc) -> list[str]:
    """The supervised runs of a sample, decoded."""
    runs, cur = [], []
    for t, lab in zip(enc["input_ids"], enc["labels"]):
        if lab != -100:
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    return [tok.decode(r) for r in runs + ([cur] if cur else [])]


@pytest.fixture()
def with_template(demo_tokenizer):
    def make(template: str):
        tok = copy.deepcopy(demo_tokenizer)
        tok.chat_template = template
        return tok
    return make


def test_auto_finds_what_a_template_rewrites_by_rendering(with_template, demo_tokenizer):
    assert history_rewrites(demo_tokenizer) == ()  # plain ChatML renders every turn as at inference
    assert history_rewrites(with_template(FIELD_ON_LAST)) == ("reasoning_content",)
    assert history_rewrites(with_template(DROPS_ALWAYS)) == ("reasoning",)
    assert history_rewrites(with_template(CLOSES_THINK)) == ()  # no reasoning at inference either
    assert [view for view, _ in encode_samples(with_template(CLOSES_THINK), CHAT)] == [None]
    for template, chat in ((FIELD_ON_LAST, FIELD_CHAT), (DROPS_ALWAYS, CHAT)):
        tok = with_template(template)
        assert len(split_views(tok, chat, None, train_on="assistant", split_turns="auto")) == 2
        plain = [{k: v for k, v in m.items() if k != "reasoning_content"} for m in CHAT[:1]] + [
            {"role": "assistant", "content": "51."}, CHAT[2], {"role": "assistant", "content": "60."}]
        assert split_views(tok, plain, None, train_on="assistant", split_turns="auto") is None  # nothing rewritten


def test_a_split_sample_trains_its_reply_as_at_inference(with_template):
    """Hand-written: the reasoning a template keeps only on a final reply, or never, is trained for each turn."""
    tok = with_template(FIELD_ON_LAST)
    samples = encode_samples(tok, FIELD_CHAT)
    assert [view.turn for view, _ in samples] == [1, 3] and not any(view.built for view, _ in samples)
    for (view, enc), want in zip(samples, ["<think>\n17 * 3 = 51.\n</think>\n\n17 times 3 is 51.<|im_end|>",
                                           "<think>\n51 + 9 = 60.\n</think>\n\nThat makes 60.<|im_end|>"]):
        prefix = FIELD_CHAT[:view.turn + 1]
        assert enc["input_ids"] == tok.apply_chat_template(prefix, tokenize=True, return_dict=True)["input_ids"]
        assert trained_text(tok, enc) == [want]
    # Kept whole, the first reply's reasoning is never trained.
    (view, whole), = encode_samples(tok, FIELD_CHAT, split_turns="never")
    assert view is None and trained_text(tok, whole)[0] == "17 times 3 is 51.<|im_end|>"

    tok = with_template(DROPS_ALWAYS)
    (v1, first), (v3, last) = encode_samples(tok, CHAT)
    assert v1.built and v3.built
    prompt = tok.apply_chat_template(CHAT[:1], tokenize=False, add_generation_prompt=True)
    assert v1.text == prompt + "17 * 3 = 51.\n</think>\n\n17 times 3 is 51.<|im_end|>"
    assert trained_text(tok, first) == ["17 * 3 = 51.\n</think>\n\n17 times 3 is 51.<|im_end|>"]
    assert trained_text(tok, last) == ["51 + 9 = 60.\n</think>\n\nThat makes 60.<|im_end|>"]
    # Even a conversation of one reply: the template never renders its reasoning, inference always has it.
    (view, enc), = encode_samples(tok, CHAT[:2])
    assert view.built and trained_text(tok, enc) == ["17 * 3 = 51.\n</think>\n\n17 times 3 is 51.<|im_end|>"]
    # A prompt that opens the reply's <think> block: the template's own rendering is the view, and what the
    # prompt supplies is not trained (nor written twice).
    tok = with_template(OPENS_THINK)
    samples = encode_samples(tok, CHAT)
    assert [(view.turn, view.built) for view, _ in samples] == [(1, False), (3, False)]
    assert samples[0][1]["input_ids"] == tok.apply_chat_template(CHAT[:2], tokenize=True, return_dict=True)["input_ids"]
    assert trained_text(tok, samples[0][1]) == ["17 * 3 = 51.\n</think>\n\n17 times 3 is 51.<|im_end|>"]
    assert [view for view, _ in encode_samples(tok, CHAT[:2])] == [None]
    for template, chat in ((FIELD_ON_LAST, FIELD_CHAT), (DROPS_ALWAYS, CHAT), (OPENS_THINK, CHAT)):
        assert check_record(with_template(template), chat, None, "assistant", "auto") == []


def test_always_never_and_the_trained_turns(demo_tokenizer):
    tok = demo_tokenizer  # ChatML: nothing rewritten
    assert [v for v, _ in encode_samples(tok, CHAT)] == [None]
    samples = encode_samples(tok, CHAT, split_turns="always")
    assert [v.turn for v, _ in samples] == [1, 3]
    for view, enc in samples:
        assert enc["input_ids"] == tok.apply_chat_template(CHAT[:view.turn + 1], tokenize=True,
                                                           return_dict=True)["input_ids"]
        assert trained_text(tok, enc) == [CHAT[view.turn]["content"] + "<|im_end|>"]
    assert check_record(tok, CHAT, None, "assistant", "always") == []
    assert [v for v, _ in encode_samples(tok, CHAT[:2], split_turns="always")] == [None]  # one reply: whole
    assert [v for v, _ in encode_samples(tok, CHAT, train_on="last", split_turns="always")] == [None]
    flagged = [*CHAT[:3], {**CHAT[3], "train": False}]  # an untrained reply gets no sample
    assert [v.turn for v, _ in encode_samples(tok, [*flagged, *CHAT[2:]], split_turns="always")] == [1, 5]
    assert [v for v, _ in encode_samples(tok, CHAT, train_on="all", split_turns="auto")] == [None]
    assert [(m["content"][:3], m.get("train")) for m in turn_messages(CHAT, 1)] == [("Wha", None), ("<th", True)]


def test_the_audit_catches_a_wrong_split_sample(with_template):
    tok = with_template(FIELD_ON_LAST)
    (view, enc), _ = encode_samples(tok, FIELD_CHAT)
    sample = turn_messages(FIELD_CHAT, view.turn)
    assert check_masks(tok, sample, None, enc, [view.turn]) == []
    labels = list(enc["labels"])
    labels[2] = enc["input_ids"][2]  # train a token of the user turn
    assert [p.rule for p in check_masks(tok, sample, None, {**enc, "labels": labels}, [1])] == ["only_replies_trained"]
    # Kept whole although its first reply is rendered without its reasoning: history_as_at_inference.
    whole = encode_conversation(tok, FIELD_CHAT)
    assert [p.rule for p in check_history(tok, FIELD_CHAT, None, whole, [1, 3])] == ["history_as_at_inference"]

    tok = with_template(DROPS_ALWAYS)
    (view, enc), _ = encode_samples(tok, CHAT)
    assert check_built_sample(tok, CHAT, None, 1, enc) == []
    ids, labels = enc["input_ids"], enc["labels"]
    wrong = {"drop_end_of_turn": ({"input_ids": ids[:-1], "labels": labels[:-1]}, "end_of_turn_trained"),
             "untrained_reasoning": ({"input_ids": ids, "labels": [-100 if t == len(ids) - 4 else lab
                                                                   for t, lab in enumerate(labels)]}, "reply_trained"),
             "trained_prompt": ({"input_ids": ids, "labels": [ids[0], *labels[1:]]}, "prompt_as_at_inference"),
             "other_prompt": ({"input_ids": ids[1:], "labels": labels[1:]}, "prompt_as_at_inference")}
    doubled = tok(view.text[:view.prompt_end] + "<think>\n" + view.text[view.prompt_end:],
                  add_special_tokens=False)["input_ids"]
    prompt = len(tok(view.text[:view.prompt_end], add_special_tokens=False)["input_ids"])
    wrong["doubled_opener"] = ({"input_ids": doubled, "labels": [-100] * prompt + doubled[prompt:]}, "reply_trained")
    for name, (bad, rule) in wrong.items():
        assert [p.rule for p in check_built_sample(tok, CHAT, None, 1, bad)] == [rule], name


def test_the_data_stage_splits_counts_and_audits(tmp_path, with_template):
    tok = with_template(FIELD_ON_LAST)
    rows = [{"messages": FIELD_CHAT}, {"messages": FIELD_CHAT[:2]},  # one reply: nothing to split
            {"messages": [*FIELD_CHAT, {"role": "user", "content": "And 60 less 1?"},
                          {"role": "assistant", "content": "59.", "reasoning_content": "60 - 1 = 59."}]}]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    source = DataSource(name="chat", path=str(path))

    def build(**kw):
        cfg = DataConfig(sources=[source], cache_dir=str(tmp_path / "cache"), audit_samples=3, **kw)
        data = build_datasets(cfg, tok, max_length=256, seed=0)
        return data, mix_report(data, SampleSchedule([len(data.sources[0].train)], [len(data.sources[0].train)],
                                                     0, 1))[0]

    data, row = build()
    stats = data.sources[0].stats
    assert (stats["records"], stats["kept"], stats["samples"], stats["split"]) == (
        3, 3, 6, {"conversations": 2, "samples": 5})
    assert stats["audited"] == 3 and stats["statuses"] == {"ok": 6} and not data.warnings
    assert split_note(row["split"]) == "; 2 conversations split into 5 samples, one per trained turn (data.split_turns)"
    wheres = data.sources[0].train["where"]
    assert wheres[0].endswith("chat.jsonl: line 1, reply 1 of 2 (message 1)") and wheres[2].endswith("line 2")
    data, row = build(split_turns="never")
    assert data.sources[0].stats["samples"] == 3 and split_note(row["split"]) == ""
    assert any("data.split_turns=never" in w for w in data.warnings)  # the template drops reasoning: say so


def test_the_setting_is_checked_keys_the_cache_and_the_run(monkeypatch):
    with pytest.raises(ConfigError, match="data.split_turns"):
        DataConfig(split_turns="sometimes")
    with pytest.raises(ConfigError, match="train_on=all"):
        DataConfig(split_turns="always", train_on="all")
    src = DataSource(name="a", path="/nonexistent/a.jsonl")
    keys = {cache_key(src, DataConfig(sources=[src], split_turns=s), "tok", max_length=8, seed=0)
            for s in ("auto", "always", "never")}
    assert len(keys) == 3

    from sftdist.config import ModelConfig, SFTConfig
    from sftdist.lifecycle import resume_check

    monkeypatch.setattr(resume_check, "tokenizer_fingerprint", lambda tokenizer: "tok")
    model = ModelConfig(tokenizer="t", from_config={"model_type": "llama", "hidden_size": 16})
    saved = resume_check.run_settings(SFTConfig(model=model), None)
    now = resume_check.run_settings(SFTConfig(model=model, data=DataConfig(split_turns="never")), None)
    assert saved["data.split_turns"] == "auto"
    with pytest.raises(ConfigError, match="data.split_turns: auto -> never"):
        resume_check.check_unchanged(saved, now, checkpoint="ck", allow=False)


def test_a_reasoning_field_reaches_the_template():
    msgs, _ = to_conversation({"messages": [{"role": "user", "content": "Hi", "reasoning_content": None},
                                            {"role": "assistant", "content": "Yo", "reasoning_content": "greet"}]},
                              "messages", "a.jsonl: line 1")
    assert msgs == [{"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Yo", "reasoning_content": "greet"}]
    with pytest.raises(DataError, match="reasoning_content must be a string"):
        to_conversation({"messages": [{"role": "user", "content": "Hi"},
                                      {"role": "assistant", "content": "Yo", "reasoning_content": ["x"]}]},
                        "messages", "a.jsonl: line 1")


# --- the real templates in ../shared --------------------------------------------------------------------

# What auto finds on the shared templates (test_auto_finds_exactly_the_shared_templates_that_rewrite proves
# the list): Qwen3 drops earlier reasoning (and a final reply's empty <think> block), DeepSeek-R1 drops all
# reasoning and opens <think> in its generation prompt, Mistral v0.3 drops the system prompt unless a user
# message ends the conversation.
REWRITING = ["deepseek-r1-distill-qwen", "mistral-7b-instruct-v0.3", "qwen3"]
SHARED_CHATS = {"reasoning": CHAT, "reasoning_content": FIELD_CHAT, "system": SYSTEM_CHAT,
                "single_reasoning": CHAT[:2], "plain": [CHAT[0], {"role": "assistant", "content": "51."},
                                                        CHAT[2], {"role": "assistant", "content": "60."}]}
needs_shared = pytest.mark.skipif(not TEMPLATES, reason="../shared/chat_templates is not present beside the checkout")


@functools.lru_cache(maxsize=None)
def shared_tokenizer(name: str, base: str = "qwen2"):
    return template_tokenizer(base, (SHARED / "chat_templates" / f"{name}.jinja").read_text())


def renders(tok, messages) -> bool:
    try:
        tok.apply_chat_template(messages, tokenize=False)
        return True
    except Exception:  # noqa: BLE001 - the template refuses this conversation (e.g. a system message)
        return False


@needs_shared
def test_auto_finds_exactly_the_shared_templates_that_rewrite(capsys, demo_tokenizer):
    """Detection compares rendered text, so each template's markers ride on the small demo vocabulary here
    (27 copies of Qwen2's took 12 s); the exactness test below uses real vocabularies."""
    marked = {p.stem: template_tokenizer(demo_tokenizer, p.read_text()) for p in TEMPLATES}
    found = {name: history_rewrites(tok) for name, tok in marked.items()}
    with capsys.disabled():
        print("\n  " + "\n  ".join(f"{name:32} {', '.join(probes)}" for name, probes in found.items() if probes))
    assert sorted(name for name, probes in found.items() if probes) == REWRITING
    assert found["qwen3"] == ("plain", "reasoning", "reasoning_content", "system")
    assert found["deepseek-r1-distill-qwen"] == ("reasoning",)
    assert found["mistral-7b-instruct-v0.3"] == ("system",)
    for name in ("chatml", "llama-3-instruct", "qwen2.5-instruct", "gemma-it", "phi-3", "smollm3"):
        tok = marked[name]
        for chat in SHARED_CHATS.values():
            if renders(tok, chat):
                assert [v for v, _ in encode_samples(tok, chat)] == [None], (name, chat)


@needs_shared
@pytest.mark.parametrize("base", ["qwen2", "llama2-sentencepiece"])
@pytest.mark.parametrize("name", REWRITING)
def test_every_split_sample_is_exact_on_the_templates_that_rewrite(name, base):
    """Each sample is what inference sees: the template's own rendering of the conversation up to its reply
    (``apply_chat_template(messages[:k+1])``), or, where that drops the reply's reasoning or its system
    prompt, the generation prompt ``apply_chat_template(messages[:k], add_generation_prompt=True)`` and the
    reply. Exactly that reply (and its end-of-turn token) is supervised, by the audit's own rules."""
    tok = shared_tokenizer(name, base)
    split = 0
    for cname, chat in SHARED_CHATS.items():
        if not renders(tok, chat):
            continue
        for view, enc in encode_samples(tok, chat):
            if view is None:
                continue
            split += 1
            k = view.turn
            if view.built:
                prompt = tok.apply_chat_template(chat[:k], tokenize=True, add_generation_prompt=True,
                                                 return_dict=True)["input_ids"]
                assert enc["input_ids"][:len(prompt)] == list(prompt), (cname, k)
                assert enc["labels"][len(prompt):] == enc["input_ids"][len(prompt):], (cname, k)
                assert check_built_sample(tok, chat, None, k, enc) == [], (cname, k)
            else:
                ref = tok.apply_chat_template(chat[:k + 1], tokenize=True, return_dict=True)["input_ids"]
                assert enc["input_ids"] == list(ref), (cname, k)
                assert check_masks(tok, turn_messages(chat, k), None, enc, [k]) == [], (cname, k)
            trained = trained_text(tok, enc)
            assert len(trained) == 1, (cname, k, trained)  # that reply alone
            reply = chat[k]["content"].split("</think>")[-1].strip()
            assert " ".join(reply.split()) in " ".join(trained[0].split()), (cname, k, trained)
            if "</think>" in chat[k]["content"] or chat[k].get("reasoning_content"):
                reasoning = chat[k].get("reasoning_content") or chat[k]["content"].split("</think>")[0][8:].strip()
                if name != "deepseek-r1-distill-qwen" or "reasoning_content" not in chat[k]:  # DeepSeek ignores it
                    assert reasoning in trained[0], (cname, k, trained)
        assert check_record(tok, chat, None, "assistant", "auto") == [], cname
        assert check_record(tok, chat, None, "last", "auto") == [], cname
    assert split >= 2


@needs_shared
def test_mistral_v03_whole_conversation_loses_its_system_prompt():
    """Why Mistral v0.3 splits: the template writes the system prompt into the last user message only when
    that message ends the conversation, so no reply of a whole conversation is trained with it."""
    tok = shared_tokenizer("mistral-7b-instruct-v0.3")
    chat = SYSTEM_CHAT[:3]
    assert "careful calculator" not in tok.apply_chat_template(chat, tokenize=False)
    (view, enc), = encode_samples(tok, chat)
    assert view.built and "careful calculator" in tok.decode(enc["input_ids"])
    assert template_warnings(tok, "never") and not template_warnings(tok, "auto")
    assert trained_turns(chat, "assistant") == [2]
