"""Masks are exact on every real chat template in ../shared/chat_templates and on the shared tokenizers' own
templates, for single-turn, multi-turn, system-prompt, tool-call and reasoning conversations.

Each template is loaded the way a user's tokenizer would carry it: a real vocabulary (Qwen2 byte-level BPE,
and Llama-2 SentencePiece, whose tokens carry the space before a word) with the template's marker strings
added as special tokens. The rules are checked by ``sftdist.data.mask_rules``, which locates messages by
re-rendering with sentinels rather than by the encoder's search. A conversation kind a template cannot
render (no system role, no tool role) is skipped for that template.
"""

from __future__ import annotations

import copy
import re
from functools import lru_cache
from pathlib import Path

import pytest

from sftdist.data.mask_rules import check_masks, message_regions
from sftdist.data.template_shape import common_prefix, snap_to_token, special_strings, template_shape
from sftdist.data.tokenize import (
    _labels_without_offsets,
    encode_conversation,
    render_and_tokenize,
    trained_spans,
    trained_turns,
)

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
TEMPLATES = sorted((SHARED / "chat_templates").glob("*.jinja")) if SHARED.is_dir() else []
OWN_TEMPLATES = ["qwen2", "llama3.2-bpe", "mistral-v0.1-sentencepiece", "mistral-v0.3-sentencepiece",
                 "llama2-sentencepiece"]
BASES = ["qwen2", "llama2-sentencepiece"]

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]
CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}, "id": "call0AbCd"}
CONVERSATIONS = {
    "single": [{"role": "user", "content": "What is the capital of France?"},
               {"role": "assistant", "content": "The capital of France is Paris."}],
    "multi": [{"role": "user", "content": "Give me a word that rhymes with cat."},
              {"role": "assistant", "content": "Hat."},
              {"role": "user", "content": "Another one, please."},
              {"role": "assistant", "content": "Mat, as in a floor mat."}],
    "system": [{"role": "system", "content": "You are a concise support agent for Acme."},
               {"role": "user", "content": "My order #1234 never arrived."},
               {"role": "assistant", "content": "Sorry about that! Could you confirm the shipping address?"},
               {"role": "user", "content": "It is 12 Rue de Rivoli, Paris."},
               {"role": "assistant", "content": "Thanks. A replacement ships today; tracking follows by email."}],
    "tools": [{"role": "user", "content": "What is the weather in Paris?"},
              {"role": "assistant", "content": "", "tool_calls": [CALL]},
              {"role": "tool", "content": "18C and sunny", "name": "get_weather", "tool_call_id": "call0AbCd"},
              {"role": "assistant", "content": "It is 18C and sunny in Paris."}],
    "reasoning": [{"role": "user", "content": "What is 17 times 3?"},
                  {"role": "assistant", "content": "<think>\n17 * 3 = 51.\n</think>\n\n17 times 3 is 51."},
                  {"role": "user", "content": "And 51 plus 9?"},
                  {"role": "assistant", "content": "<think>\n51 + 9 = 60.\n</think>\n\nThat makes 60."}],
}
# The marker strings a template writes literally: what a model's tokenizer registers as special tokens.
MARKER_RE = re.compile(r"<\|[^|<>\s]{1,40}\|>|<｜[^｜<>\s]{1,40}｜>|<[a-z_]{2,30}>|</[a-z_]{2,30}>|\[/?[A-Z_]{2,20}\]"
                       r"|<s>|</s>|<\|?[A-Z_]{3,40}\|?>"
                       r"|<\|[A-Za-z_\"]{1,30}>|<[A-Za-z_]{1,30}\|>|</?[a-z_]{2,20}:[a-z_]{2,30}>")  # <|turn> <seed:eos>
GENERATION_TAG = re.compile(r"{%-?\s*generation\s*-?%}")
EOT_GUESS = ("<|eot_id|>", "<|im_end|>", "<end_of_turn>", "<|end|>", "<|END_OF_TURN_TOKEN|>", "<|end_of_text|>",
             "<｜end▁of▁sentence｜>", "<|end_of_turn|>", "<|endoftext|>")


@lru_cache(maxsize=None)
def _base(name: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(SHARED / "tokenizers" / name)


def template_tokenizer(base, template: str):
    """A real vocabulary carrying ``template``, with its markers, bos and eos as special tokens (``base``: a
    tokenizer of ../shared/tokenizers by name, or a tokenizer, which is copied)."""
    tok = copy.deepcopy(_base(base) if isinstance(base, str) else base)
    markers = set(MARKER_RE.findall(template)) - {"<<SYS>>", "<</SYS>>"}
    eos = next((e for e in EOT_GUESS if e in template), "</s>")
    bos = next((b for b in ("<s>", "<|begin_of_text|>", "<｜begin▁of▁sentence｜>", "<bos>", "<BOS_TOKEN>") if b in template),
               tok.bos_token or "<|bos|>")
    new = sorted((markers | {eos, bos}) - set(tok.added_tokens_encoder))  # plain BPE entries too (Qwen2 has "</s>")
    tok.add_special_tokens({"additional_special_tokens": new})
    tok.eos_token, tok.bos_token, tok.chat_template = eos, bos, template
    return tok


def renders(tok, messages) -> bool:
    try:
        tok.apply_chat_template(messages, tools=TOOLS if "tool_calls" in str(messages) else None, tokenize=False)
        return True
    except Exception:  # noqa: BLE001 - the template rejects this conversation shape
        return False


def tools_for(messages):
    return TOOLS if any(m.get("tool_calls") for m in messages) else None


def pair_problems(tok, messages) -> list[str]:
    """Every rule broken for one template-conversation pair, for train_on=assistant and last."""
    tools = tools_for(messages)
    problems = []
    for train_on in ("assistant", "last"):
        try:
            enc = encode_conversation(tok, messages, tools=tools, train_on=train_on)
        except Exception as e:  # noqa: BLE001
            return [f"encode raised {type(e).__name__}: {e}"]
        problems += [f"train_on={train_on}: {p}" for p in
                     check_masks(tok, messages, tools, enc, trained_turns(messages, train_on), train_on)]
        # The offsets-free path (pure-Python tokenizers) must give the same labels.
        text, ids, _ = render_and_tokenize(tok, messages, tools)
        spans = trained_spans(tok, messages, tools, text, train_on)
        if _labels_without_offsets(tok, text, ids, spans) != enc["labels"]:
            problems.append(f"train_on={train_on}: the offsets-free path labels differently")
    return problems


def corpus_cases():
    for path in TEMPLATES:
        for base in BASES:
            yield path.stem, base


@pytest.mark.skipif(not TEMPLATES, reason="../shared/chat_templates is not present beside the checkout")
@pytest.mark.parametrize("template,base", list(corpus_cases()))
def test_template_masks_are_exact(template, base):
    tok = template_tokenizer(base, (SHARED / "chat_templates" / f"{template}.jinja").read_text())
    failures, tried = [], 0
    for cname, messages in CONVERSATIONS.items():
        if not renders(tok, messages):
            continue
        tried += 1
        failures += [f"{template}/{cname}: {p}" for p in pair_problems(tok, messages)]
    assert tried >= 1, f"{template} renders none of the test conversations"
    assert not failures, "\n".join(failures)


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared is not present beside the checkout")
@pytest.mark.parametrize("name", OWN_TEMPLATES)
def test_shared_tokenizer_templates_are_exact(name):
    tok = _base(name)
    tried = 0
    for cname, messages in CONVERSATIONS.items():
        if not renders(tok, messages):
            continue
        tried += 1
        assert pair_problems(tok, messages) == [], (name, cname)
    assert tried >= 2


@pytest.mark.skipif(not TEMPLATES, reason="../shared/chat_templates is not present beside the checkout")
@pytest.mark.parametrize("template", [p.stem for p in TEMPLATES if GENERATION_TAG.search(p.read_text())])
def test_trained_set_equals_the_templates_generation_mask(template):
    """For templates that carry {% generation %} tags, sftdist's labels are HF's assistant mask.

    Compared after each reply's generation prompt: SmolLM3's and DeepSeek-V3's tags also wrap the header
    ``<|im_start|>assistant\\n``, which inference supplies and which is never a target. A conversation with a
    reply the template does not render (tool calls it ignores) is skipped: HF would train the empty turn's
    end-of-turn token alone, teaching the model to answer with nothing.
    """
    tok = template_tokenizer("qwen2", (SHARED / "chat_templates" / f"{template}.jinja").read_text())
    compared = 0
    for cname, messages in CONVERSATIONS.items():
        if not renders(tok, messages):
            continue
        tools = tools_for(messages)
        text, ids, offsets = render_and_tokenize(tok, messages, tools)
        regions = message_regions(tok, messages, tools, text)
        if any(m["role"] == "assistant" and i not in regions for i, m in enumerate(messages)):
            continue
        headers = []
        for i, m in enumerate(messages[1:], start=1):
            prompt = tok.apply_chat_template(messages[:i], tools=tools, tokenize=False, add_generation_prompt=True)
            bare = tok.apply_chat_template(messages[:i], tools=tools, tokenize=False)
            # The prompt may hold more than a finished turn does (DeepSeek's "<think>\\n"): compare up to
            # where it stops agreeing with the conversation.
            agreed = snap_to_token(text, common_prefix(prompt, text), special_strings(tok))
            if m["role"] == "assistant" and prompt.startswith(bare) and agreed >= len(bare):
                headers.append((len(bare), agreed))
        hf = tok.apply_chat_template(messages, tools=tools, tokenize=True, return_dict=True,
                                     return_assistant_tokens_mask=True)
        ours = encode_conversation(tok, messages, tools=tools)
        assert list(hf["input_ids"]) == ours["input_ids"]
        for t, (lab, m) in enumerate(zip(ours["labels"], hf["assistant_masks"])):
            s, e = offsets[t]
            in_header = any(a <= s and e <= b for a, b in headers)
            if text[s:e].strip() and not in_header:  # whitespace after an end-of-turn may go either way
                assert (lab != -100) == bool(m), (template, cname, t, text[s:e])
                compared += 1
    assert compared > 0


@pytest.mark.skipif(not TEMPLATES, reason="../shared/chat_templates is not present beside the checkout")
def test_count_exact_pairs_per_template(capsys):
    """Counts and prints, per template family, how many template-conversation pairs are exact."""
    rows, misses = [], []
    for path in TEMPLATES:
        tok = template_tokenizer("qwen2", path.read_text())
        exact = total = 0
        for cname, messages in CONVERSATIONS.items():
            if not renders(tok, messages):
                continue
            total += 1
            problems = pair_problems(tok, messages)
            exact += not problems
            misses += [f"{path.stem}/{cname}: {p}" for p in problems]
        rows.append((path.stem, template_shape(tok).family.rsplit(" template", 1)[0], exact, total))
    with capsys.disabled():
        print("\n  template                          family                    exact/pairs")
        for name, family, exact, total in rows:
            print(f"  {name:33} {family:25} {exact}/{total}")
        print(f"  all: {sum(r[2] for r in rows)}/{sum(r[3] for r in rows)} pairs exact")
    assert not misses, "\n".join(misses)


def _spans(labels):
    runs, cur = [], None
    for t, lab in enumerate(labels):
        if lab != -100 and cur is None:
            cur = t
        elif lab == -100 and cur is not None:
            runs.append((cur, t))
            cur = None
    return runs + ([(cur, len(labels))] if cur is not None else [])


CORRUPTIONS = {  # name: (template, base, conversation, rule the checks must name)
    "drop_end_of_turn": ("chatml", "qwen2", "multi", "end_of_turn_trained"),
    "drop_first_word": ("mistral-7b-instruct-v0.3", "llama2-sentencepiece", "system", "reply_trained"),
    "drop_straddling_last_token": ("falcon-instruct", "qwen2", "multi", "reply_trained"),
    "drop_earlier_turn": ("qwen3", "qwen2", "multi", "reply_trained"),
    "train_next_header": ("starcoder2-instruct", "qwen2", "multi", "only_replies_trained"),
    "train_user_text": ("llama-3-instruct", "qwen2", "system", "only_replies_trained"),
}


@pytest.mark.skipif(not TEMPLATES, reason="../shared/chat_templates is not present beside the checkout")
@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_the_rules_catch_each_kind_of_wrong_mask(corruption):
    """Negative controls: each defect of the old encoder (and its mirror image) is caught and named."""
    template, base, cname, rule = CORRUPTIONS[corruption]
    tok = template_tokenizer(base, (SHARED / "chat_templates" / f"{template}.jinja").read_text())
    messages = CONVERSATIONS[cname]
    enc = encode_conversation(tok, messages)
    trained = trained_turns(messages, "assistant")
    assert check_masks(tok, messages, None, enc, trained) == []
    labels, ids = list(enc["labels"]), enc["input_ids"]
    (a0, b0), (a1, b1) = _spans(labels)[:2]
    if corruption == "drop_end_of_turn":
        labels[b0 - 1] = -100
    elif corruption == "drop_first_word":
        labels[a0] = -100
    elif corruption == "drop_straddling_last_token":
        assert tok.decode([ids[b0 - 1]]).endswith("\n")  # Falcon's ".\n": the reply's last token
        labels[b0 - 1] = -100
    elif corruption == "drop_earlier_turn":
        labels[a0:b0] = [-100] * (b0 - a0)
    elif corruption == "train_next_header":
        labels[b0:a1] = ids[b0:a1]
    else:
        labels[2] = ids[2]
    problems = check_masks(tok, messages, None, {"input_ids": ids, "labels": labels}, trained)
    assert [p.rule for p in problems][:1] == [rule], problems
