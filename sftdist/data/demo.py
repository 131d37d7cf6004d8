"""The built-in demo: a chat data set, a generic-text set and a tokenizer, all generated offline.

Everything is deterministic, so every rank and every machine builds byte-identical files. They are written
once to a cache directory (``$SFTDIST_CACHE``, default ``~/.cache/sftdist``) and then read like any
user's data, through the same loading path.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path

DEMO_VERSION = "v1"
END_OF_TURN = "<|im_end|>"
END_OF_TEXT = "<|endoftext|>"
SPECIAL_TOKENS = [END_OF_TEXT, "<|im_start|>", END_OF_TURN]
# ChatML, written without {% generation %} tags on purpose: sftdist's masking must not depend on them.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

_CAPITALS = {
    "France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Kenya": "Nairobi", "Peru": "Lima",
    "Canada": "Ottawa", "Egypt": "Cairo", "Norway": "Oslo", "Chile": "Santiago", "Spain": "Madrid",
    "Greece": "Athens", "Poland": "Warsaw", "Cuba": "Havana", "Ireland": "Dublin", "Austria": "Vienna",
}
_WORDS = ["planet", "garden", "silver", "rocket", "window", "forest", "candle", "bridge", "pencil", "orange",
          "river", "castle", "marble", "jungle", "violin", "harbor", "meadow", "tunnel", "puzzle", "lantern"]
_SYSTEM_PROMPTS = ["You are a precise assistant. Answer in one short sentence.",
                   "You are a helpful assistant.",
                   "Keep every answer brief and exact."]


def _task(rng: random.Random) -> tuple[str, str]:
    """One (question, answer) pair from a small family of tasks with a fixed answer format."""
    kind = rng.randrange(6)
    if kind == 0:
        a, b = rng.randint(1, 50), rng.randint(1, 50)
        op, sym, val = rng.choice([("plus", "+", a + b), ("minus", "-", a - b), ("times", "*", a * b)])
        return f"What is {a} {op} {b}?", f"{a} {sym} {b} = {val}."
    if kind == 1:
        w = rng.choice(_WORDS)
        return f'Reverse the word "{w}".', f'Reversed: "{w[::-1]}".'
    if kind == 2:
        country = rng.choice(sorted(_CAPITALS))
        return f"What is the capital of {country}?", f"The capital of {country} is {_CAPITALS[country]}."
    if kind == 3:
        words = " ".join(rng.sample(_WORDS, 2))
        return f"Make this uppercase: {words}", f"Uppercase: {words.upper()}."
    if kind == 4:
        w = rng.choice(_WORDS)
        return f'How many letters are in "{w}"?', f'"{w}" has {len(w)} letters.'
    nums = rng.sample(range(1, 100), rng.randint(3, 5))
    return (f"Sort these numbers: {', '.join(map(str, nums))}",
            f"Sorted: {', '.join(map(str, sorted(nums)))}.")


def demo_conversations(n: int = 600, seed: int = 0) -> list[dict]:
    """Chat records ``{"messages": [...]}``: 1-3 exchanges each, a system prompt in about a third."""
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        messages = []
        if rng.random() < 0.35:
            messages.append({"role": "system", "content": rng.choice(_SYSTEM_PROMPTS)})
        for _turn in range(rng.choice([1, 1, 2, 3])):
            question, answer = _task(rng)
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        records.append({"messages": messages})
    return records


def demo_generic_texts(n: int = 200, seed: int = 1) -> list[dict]:
    """Generic prose records ``{"text": ...}``, the replay data of the demo mix."""
    rng = random.Random(seed)
    subjects = ["The old harbor", "A quiet village", "The northern forest", "The city library", "A small farm"]
    verbs = ["changes slowly", "wakes early", "stays calm", "grows every year", "welcomes travellers"]
    details = ["in the spring", "after the rain", "during long winters", "when the market opens", "at dusk"]
    records = []
    for _ in range(n):
        sentences = [f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(details)}."
                     for _ in range(rng.randint(2, 5))]
        records.append({"text": " ".join(sentences)})
    return records


def _write_jsonl(path: Path, records: list[dict]) -> None:
    with path.open("w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def _train_tokenizer(texts: list[str], out_dir: Path) -> None:
    """Train a small byte-level BPE on the demo corpus and save it as an HF fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1024, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=END_OF_TURN, pad_token=END_OF_TEXT,
                                 chat_template=CHAT_TEMPLATE, model_max_length=4096)
    hf.save_pretrained(out_dir)


def cache_root() -> Path:
    """Where built-in assets are written: ``$SFTDIST_CACHE`` or ``~/.cache/sftdist``."""
    return Path(os.environ.get("SFTDIST_CACHE", Path.home() / ".cache" / "sftdist"))


def ensure_demo_assets() -> Path:
    """Build the demo data and tokenizer once and return their directory.

    Ranks may call this at the same time: each builds in a private temporary directory and renames it into
    place; the content is deterministic, so whichever rename wins, the result is the same.

    Returns:
        A directory holding ``demo_chat.jsonl``, ``demo_generic.jsonl`` and ``tokenizer/``.
    """
    final = cache_root() / f"demo-{DEMO_VERSION}"
    if (final / "tokenizer" / "tokenizer.json").exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".demo-", dir=final.parent))
    chat, generic = demo_conversations(), demo_generic_texts()
    _write_jsonl(tmp / "demo_chat.jsonl", chat)
    _write_jsonl(tmp / "demo_generic.jsonl", generic)
    corpus = ([f"{m['role']}\n{m['content']}" for r in chat for m in r["messages"]]
              + [r["text"] for r in generic])
    _train_tokenizer(corpus, tmp / "tokenizer")
    try:
        os.rename(tmp, final)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def resolve_builtin(path: str) -> str:
    """Map ``builtin:NAME`` to its file or directory; return any other path unchanged.

    Raises:
        ValueError: for an unknown built-in name.
    """
    if not path.startswith("builtin:"):
        return path
    name = path.split(":", 1)[1]
    targets = {"demo": "tokenizer", "demo_chat": "demo_chat.jsonl", "demo_generic": "demo_generic.jsonl"}
    if name not in targets:
        raise ValueError(f"unknown built-in {path!r}; known: {['builtin:' + k for k in targets]}")
    return str(ensure_demo_assets() / targets[name])
