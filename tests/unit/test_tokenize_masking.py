"""Masks are token-exact: hand-written expected labels on the demo tokenizer, and the property that the
supervised tokens decode to exactly the assistant contents plus their end-of-turn token, on the demo
tokenizer and on the real tokenizers in ../shared."""

import pytest

from sftdist.data.tokenize import IGNORE_INDEX, encode_conversation, encode_text

CONVERSATIONS = {
    "single": [{"role": "user", "content": "What is 2 plus 3?"}, {"role": "assistant", "content": "2 + 3 = 5."}],
    "system": [{"role": "system", "content": "Keep every answer brief and exact."},
               {"role": "user", "content": "What is the capital of Peru?"},
               {"role": "assistant", "content": "The capital of Peru is Lima."}],
    "multi": [{"role": "user", "content": 'Reverse the word "river".'},
              {"role": "assistant", "content": 'Reversed: "revir".'},
              {"role": "user", "content": "Sort these numbers: 9, 4, 7"},
              {"role": "assistant", "content": "Sorted: 4, 7, 9."},
              {"role": "user", "content": "Make this uppercase: quiet meadow"},
              {"role": "assistant", "content": "Uppercase: QUIET MEADOW."}],
}


def supervised_spans(enc):
    """Maximal runs of supervised positions as lists of token ids."""
    spans, cur = [], []
    for tok, lab in zip(enc["input_ids"], enc["labels"]):
        if lab != IGNORE_INDEX:
            assert lab == tok, "labels must equal input_ids where supervised"
            cur.append(tok)
        elif cur:
            spans.append(cur)
            cur = []
    return spans + ([cur] if cur else [])


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_expected_labels_single_turn(demo_tokenizer):
    tok = demo_tokenizer
    enc = encode_conversation(tok, CONVERSATIONS["single"])
    prompt = ids(tok, "<|im_start|>user\nWhat is 2 plus 3?<|im_end|>\n<|im_start|>assistant\n")
    reply = ids(tok, "2 + 3 = 5.<|im_end|>")
    newline = ids(tok, "\n")
    assert enc["input_ids"] == prompt + reply + newline
    assert enc["labels"] == [IGNORE_INDEX] * len(prompt) + reply + [IGNORE_INDEX] * len(newline)


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_sequence_equals_apply_chat_template(demo_tokenizer, name):
    msgs = CONVERSATIONS[name]
    enc = encode_conversation(demo_tokenizer, msgs)
    assert enc["input_ids"] == list(demo_tokenizer.apply_chat_template(msgs, tokenize=True)["input_ids"])


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_supervised_tokens_decode_to_assistant_contents_plus_eot(demo_tokenizer, name):
    msgs = CONVERSATIONS[name]
    spans = supervised_spans(encode_conversation(demo_tokenizer, msgs))
    want = [m["content"] + "<|im_end|>" for m in msgs if m["role"] == "assistant"]
    assert [demo_tokenizer.decode(s) for s in spans] == want


def test_train_on_last_and_all(demo_tokenizer):
    msgs = CONVERSATIONS["multi"]
    last = encode_conversation(demo_tokenizer, msgs, train_on="last")
    assert [demo_tokenizer.decode(s) for s in supervised_spans(last)] == ["Uppercase: QUIET MEADOW.<|im_end|>"]
    everything = encode_conversation(demo_tokenizer, msgs, train_on="all")
    assert everything["labels"] == everything["input_ids"]


def test_truncation_keeps_prefix(demo_tokenizer):
    full = encode_conversation(demo_tokenizer, CONVERSATIONS["multi"])
    cut = encode_conversation(demo_tokenizer, CONVERSATIONS["multi"], max_length=20)
    assert cut["input_ids"] == full["input_ids"][:20] and cut["labels"] == full["labels"][:20]


def test_encode_text_trains_every_token_and_ends_with_eos(demo_tokenizer):
    enc = encode_text(demo_tokenizer, "A quiet village wakes early.")
    assert enc["labels"] == enc["input_ids"]
    assert enc["input_ids"][-1] == demo_tokenizer.eos_token_id
    assert demo_tokenizer.decode(enc["input_ids"][:-1]) == "A quiet village wakes early."


# Real tokenizers with their own chat templates: the end-of-turn string each template emits after a reply.
REAL = {"qwen2": "<|im_end|>", "llama3.2-bpe": "<|eot_id|>", "mistral-v0.3-sentencepiece": "</s>",
        "llama2-sentencepiece": "</s>"}


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_tokenizer_masks(shared_dir, name):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(shared_dir / "tokenizers" / name)
    # Llama-2/Mistral templates allow a system prompt only in some versions; use plain alternation.
    msgs = CONVERSATIONS["multi"]
    enc = encode_conversation(tok, msgs)
    rendered = tok.apply_chat_template(msgs, tokenize=True)
    assert enc["input_ids"] == list(rendered["input_ids"] if hasattr(rendered, "keys") else rendered)
    decoded = [tok.decode(s).strip() for s in supervised_spans(enc)]
    for got, msg in zip(decoded, [m for m in msgs if m["role"] == "assistant"], strict=True):
        assert got.startswith(msg["content"]), (got, msg["content"])
        assert got[len(msg["content"]):].strip() == REAL[name], got  # nothing but the end-of-turn token


def test_per_message_train_flags(demo_tokenizer):
    msgs = [dict(m) for m in CONVERSATIONS["multi"]]
    msgs[1]["train"] = False  # e.g. loss_weight 0 on the first reply
    spans = [demo_tokenizer.decode(s) for s in supervised_spans(encode_conversation(demo_tokenizer, msgs))]
    assert spans == ["Sorted: 4, 7, 9.<|im_end|>", "Uppercase: QUIET MEADOW.<|im_end|>"]
    msgs[1]["train"] = True  # an explicit flag wins over train_on=last
    spans = [demo_tokenizer.decode(s) for s in
             supervised_spans(encode_conversation(demo_tokenizer, msgs, train_on="last"))]
    assert spans == ['Reversed: "revir".<|im_end|>', "Uppercase: QUIET MEADOW.<|im_end|>"]


def test_train_flag_on_a_user_turn_is_refused(demo_tokenizer):
    from sftdist.data.tokenize import MaskError

    msgs = [{"role": "user", "content": "Hi", "train": True}, {"role": "assistant", "content": "Yo"}]
    with pytest.raises(MaskError, match="only assistant turns"):
        encode_conversation(demo_tokenizer, msgs)


# A reasoning-style template that drops the <think> block of every assistant turn but the last, as the
# Qwen3 and DeepSeek-R1 templates do.
REWRITING_TEMPLATE = (
    "{%- for m in messages %}"
    "{%- set c = m['content'] %}"
    "{%- if m['role'] == 'assistant' and not loop.last and '</think>' in c %}"
    "{%- set c = c.split('</think>')[-1].lstrip() %}{%- endif %}"
    "{{- '<|im_start|>' + m['role'] + '\\n' + c + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def test_history_rewriting_template_trains_every_reply(demo_tokenizer):
    from sftdist.data.audit import check_record

    tok = demo_tokenizer
    original = tok.chat_template
    tok.chat_template = REWRITING_TEMPLATE
    try:
        msgs = [{"role": "user", "content": "What is 2 plus 3?"},
                {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n2 + 3 = 5."},
                {"role": "user", "content": "And 4 plus 4?"},
                {"role": "assistant", "content": "<think>\nadd again\n</think>\n\n4 + 4 = 8."}]
        enc = encode_conversation(tok, msgs)
        assert enc["input_ids"] == list(tok.apply_chat_template(msgs, tokenize=True)["input_ids"])
        # The earlier reply is rendered without its reasoning once a later turn follows: its answer is still
        # assistant text and is trained (only the dropped reasoning cannot be); the final turn, rendered as
        # at inference, is trained with its reasoning.
        assert [tok.decode(s) for s in supervised_spans(enc)] == ["2 + 3 = 5.<|im_end|>", msgs[3]["content"] + "<|im_end|>"]
        assert check_record(tok, msgs, None, "assistant") == []
    finally:
        tok.chat_template = original


def test_pure_python_tokenizer_without_offsets_masks_exactly():
    """A tokenizer that reports no character offsets (ByT5, pure Python) takes the slower path: each span
    edge is found by tokenizing the text before it. Same rule, same result."""
    from transformers import ByT5Tokenizer

    tok = ByT5Tokenizer(extra_ids=0, additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    tok.chat_template = ("{%- for m in messages %}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
                         "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
    tok.eos_token = "<|im_end|>"
    assert not tok.is_fast
    msgs = CONVERSATIONS["multi"]
    enc = encode_conversation(tok, msgs)
    assert enc["input_ids"] == list(tok.apply_chat_template(msgs, tokenize=True)["input_ids"])
    want = [m["content"] + "<|im_end|>" for m in msgs if m["role"] == "assistant"]
    assert [tok.decode(s) for s in supervised_spans(enc)] == want


@pytest.mark.parametrize("reply", ["assistant", "im_start", "\n", "Say it", "user"])
def test_reply_that_repeats_header_or_prompt_text_is_found_in_its_own_place(demo_tokenizer, reply):
    """A reply is searched after its own generation prompt: one that reads "assistant", repeats the user,
    or is only whitespace must not be anchored in the header or the prompt."""
    from sftdist.data.mask_rules import check_masks

    msgs = [{"role": "user", "content": "Say it"}, {"role": "assistant", "content": reply},
            {"role": "user", "content": "user"}, {"role": "assistant", "content": reply}]
    enc = encode_conversation(demo_tokenizer, msgs)
    assert [demo_tokenizer.decode(s) for s in supervised_spans(enc)] == [reply + "<|im_end|>"] * 2
    assert check_masks(demo_tokenizer, msgs, None, enc, [1, 3]) == []
