"""The forgetting check: how far the model being tuned has drifted from the base model on general prompts that
are never trained on (``data.forgetting_probe``, the prompts in ``sftdist.data.probes``).

Before the first step the base model answers every probe greedily, and for each token of its answer its
top-``TOP_K`` next-token distribution is kept. At every eval the tuned model is compared with that record:

- ``forgetting/kl``: the mean, over the base answers' tokens, of KL(base || tuned), teacher-forced on the base
  answer. It is computed over the base's top-k tokens plus one bucket for the rest of the vocabulary, which is
  a lower bound of the full KL (merging outcomes never raises a KL). 0 = the same predictions;
  ~0.1 = small shifts of confidence; above ~1 the model predicts other words.
- ``forgetting/answer_agreement``: the share of probes whose answer the tuned model kept: its greedy answer has
  the base's first sentence, after lower-casing and collapsing spaces (``same_answer``; stopping after the
  first sentence, as a model tuned on short replies learns to, is not forgetting), or it still finds the
  base's answer nearly as likely (the probe's KL under ``KEEP_KL``: a rewording). 1 = every answer kept.

The loss delta on held-out replay records (``eval_loss_delta/<generic source>``) does not show this:
training on the replay set improves its own held-out loss, even while general answers break.

For LoRA the base is the same model with its adapter disabled, so the record can also be (re)made on a
resume that lacks it; for full fine-tuning it exists only from step 0, and it travels in the checkpoint
(the eval state) so that a resumed run compares with the same base. Every rank runs the probe (under ZeRO-3
each forward gathers parameters collectively); rank 0 logs.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import Optional

import torch

TOP_K = 16  # next-token candidates kept per base-answer token: most of the mass of a chat model's prediction
# Probes per forward: batched generation is several times faster than one prompt at a time, and 8 rows of
# logits stay small (8 x ~100 positions x a 152k vocabulary in fp32: ~0.5 GB) next to a training step's.
PROBE_BATCH = 8
# A probe whose answer text changed still counts as kept while the tuned model finds the base's answer nearly
# as likely as the base did: a mean KL under this, per answer token, is a rewording among near-tied
# continuations ("A week is approximately 7 days." -> "There are 7 days in a week.": 0.044 on a real 135M
# chat model after 10 LoRA steps), not lost knowledge ("The capital of France is Paris." -> "My name is
# Sifty": 3.9).
KEEP_KL = 0.1


@dataclass
class BaseAnswer:
    """The base model's answer to one probe, and its next-token distributions along that answer."""

    answer_ids: list[int]  # greedy, up to and including the stop token when it came
    text: str  # decoded without special tokens
    top_ids: list[list[int]]  # per answer token: the base's TOP_K most likely tokens
    top_logp: list[list[float]]  # and their log-probabilities


def normalised(text: str) -> str:
    """An answer as compared for agreement: lower case, spaces collapsed, punctuation trimmed at both ends.

    Example:
        >>> normalised("  The capital of France is Paris.\\n")
        'the capital of france is paris'
    """
    return re.sub(r"\s+", " ", text).strip().strip(".,!?;:'\"").strip().lower()


def first_sentence(text: str) -> tuple[str, bool]:
    """``(the answer's first sentence, normalised; whether it ended)``: a sentence ends at ``.``, ``!`` or
    ``?`` before a space or the end, or at a line break; an answer cut by the token limit may not have ended.

    Example:
        >>> first_sentence("The symbol for gold is Au. It is a metal")
        ('the symbol for gold is au', True)
        >>> first_sentence("The Earth is about 129.999")
        ('the earth is about 129.999', False)
    """
    match = re.search(r"[.!?](\s|$)|\n", text.strip())
    return (normalised(text.strip()[:match.start() + 1]), True) if match else (normalised(text), False)


def same_answer(base: str, tuned: str) -> bool:
    """Whether the tuned model still gives the base model's answer: the same first sentence. Where the token
    limit cut a first sentence off, the shorter one has to start the other (at a word boundary). A model
    that learned to stop after the first sentence keeps its answers; one that says something else does not.

    Example:
        >>> same_answer("The capital of France is Paris.", "the capital of France is Paris!")
        True
        >>> same_answer("The symbol for gold is Au. It is a metal", "The symbol for gold is Au.")
        True
        >>> same_answer("The largest ocean is the Pacific Ocean, which is", "The largest ocean is the Pacific Ocean.")
        True
        >>> same_answer("The largest ocean is the Pacific", "The largest ocean is the Atlantic.")
        False
        >>> same_answer("The capital of France is Paris.", "I'm Sifty, a small assistant.")
        False
    """
    (a, a_ended), (b, b_ended) = first_sentence(base), first_sentence(tuned)
    if a_ended and b_ended:
        return a == b
    short, long = sorted((a, b), key=len)
    return bool(short) and long.startswith(short) and (len(long) == len(short) or not long[len(short)].isalnum())


def bucket_kl(base_logp: torch.Tensor, tuned_logp: torch.Tensor) -> torch.Tensor:
    """KL(base || tuned) per row over the base's top-k tokens plus one bucket for the rest of the vocabulary.

    ``base_logp`` and ``tuned_logp`` are ``[N, k]`` log-probabilities of the same k tokens per row.

    Example:
        >>> import math
        >>> same = torch.log(torch.tensor([[0.5, 0.3]]))
        >>> float(bucket_kl(same, same))
        0.0
        >>> moved = torch.log(torch.tensor([[0.2, 0.3]]))  # tuned moved 0.3 of the mass to other tokens
        >>> round(float(bucket_kl(same, moved)), 4) == round(0.5 * math.log(0.5 / 0.2) + 0.2 * math.log(0.2 / 0.5), 4)
        True
    """
    base_logp, tuned_logp = base_logp.double(), tuned_logp.double()
    rest_base = (1 - base_logp.exp().sum(-1)).clamp_min(1e-12)
    rest_tuned = (1 - tuned_logp.exp().sum(-1)).clamp_min(1e-12)
    top = (base_logp.exp() * (base_logp - tuned_logp)).sum(-1)
    return (top + rest_base * (rest_base.log() - rest_tuned.log())).clamp_min(0.0)


def peft_base(model):
    """A context in which ``model`` computes as its base model: a PEFT model's adapter disabled; none else."""
    disable = getattr(model, "disable_adapter", None)
    return disable() if callable(disable) and hasattr(model, "peft_config") else contextlib.nullcontext()


class ForgettingProbe:
    """The probe prompts, the base model's record on them, and the comparison at each eval.

    Args:
        prompts: Each probe's prompt token ids (chat template and generation prompt applied).
        questions: Each probe's last user message, as logs and ``forgetting_probe.jsonl`` name it.
        tokenizer: Decodes answers.
        stop_ids: Tokens that end an answer (EOS and the template's end-of-turn tokens).
        max_new_tokens: Tokens per answer.
        min_agreement: Below this ``answer_agreement`` a warning names the probe that changed most.
        synced: Every rank must step generation together (ZeRO-3 on several ranks).
    """

    def __init__(self, prompts: list[list[int]], questions: list[str], tokenizer, stop_ids: list[int], *,
                 max_new_tokens: int, min_agreement: float, synced: bool):
        self.prompts, self.questions, self.tokenizer, self.stop_ids = prompts, questions, tokenizer, stop_ids
        self.max_new_tokens, self.min_agreement, self.synced = max_new_tokens, min_agreement, synced
        self.base: Optional[list[BaseAnswer]] = None
        self.off_reason: Optional[str] = None  # why this run cannot measure drift (said once)

    # --- the record, kept in the checkpoint's eval state ---
    def state(self) -> Optional[dict]:
        if self.base is None:
            return None
        return {"prompts": self.prompts, "answers": [vars(b) for b in self.base]}

    def load_state(self, state: Optional[dict]) -> None:
        """Take the base record of a checkpoint, if it was made on these prompts."""
        if state and state.get("prompts") == self.prompts:
            self.base = [BaseAnswer(**a) for a in state["answers"]]

    # --- the model's answers and distributions, PROBE_BATCH prompts per forward ---
    def _answers(self, model, prompts: list[list[int]]) -> list[list[int]]:
        """Greedy answers of a batch of prompts (left-padded), each up to and including its stop token."""
        from transformers import GenerationConfig

        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.stop_ids[0]
        config = GenerationConfig(max_new_tokens=self.max_new_tokens, do_sample=False, eos_token_id=self.stop_ids,
                                  pad_token_id=pad, use_cache=True)
        width = max(len(p) for p in prompts)
        dev = next(model.parameters()).device
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=dev)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=dev)
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config, synced_gpus=self.synced)
        answers = []
        for row in out[:, width:].tolist():
            stop = next((i for i, t in enumerate(row) if t in self.stop_ids), None)
            answers.append(row[:stop + 1] if stop is not None else row)  # what follows a stop is padding
        return answers

    def _answer_logps(self, model, prompts: list[list[int]], answers: list[list[int]]) -> list[torch.Tensor]:
        """Per probe, ``[len(answer), V]`` log-probabilities of the next token along its answer, teacher-forced
        (rows right-padded: a causal model's earlier positions do not see the padding)."""
        rows = [p + a for p, a in zip(prompts, answers)]
        width = max(len(r) for r in rows)
        dev = next(model.parameters()).device
        ids = torch.tensor([r + [r[-1]] * (width - len(r)) for r in rows], device=dev)
        positions = torch.arange(width, device=dev).expand(len(rows), width)
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=positions).logits
        return [torch.log_softmax(logits[i, len(p) - 1:len(p) - 1 + len(a)].float(), dim=-1)
                for i, (p, a) in enumerate(zip(prompts, answers))]

    def _batches(self) -> list[slice]:
        return [slice(i, i + PROBE_BATCH) for i in range(0, len(self.prompts), PROBE_BATCH)]

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def record_base(self, model) -> None:
        """Answer every probe with the base model and keep its distributions (every rank calls this)."""
        base = []
        with torch.no_grad(), peft_base(model):
            for part in self._batches():
                answers = self._answers(model, self.prompts[part])
                for answer, logp in zip(answers, self._answer_logps(model, self.prompts[part], answers)):
                    top = torch.topk(logp, min(TOP_K, logp.shape[-1]), dim=-1)
                    base.append(BaseAnswer(answer, self._decode(answer), top.indices.tolist(),
                                           [[round(v, 6) for v in row] for row in top.values.tolist()]))
        self.base = base

    def measure(self, model, step: int) -> tuple[dict[str, float], list[dict], Optional[str]]:
        """``(metrics, per-probe rows, warning)`` of the tuned model against the base record."""
        agree, rows, total, count = 0, [], 0.0, 0
        with torch.no_grad():
            for part in self._batches():
                bases = self.base[part]
                logps = self._answer_logps(model, self.prompts[part], [b.answer_ids for b in bases])
                answers = self._answers(model, self.prompts[part])
                for question, base, logp, answer in zip(self.questions[part], bases, logps, answers):
                    ids = torch.tensor(base.top_ids, device=logp.device)
                    kl = bucket_kl(torch.tensor(base.top_logp, device=logp.device), logp.gather(-1, ids))
                    text = self._decode(answer)
                    same = same_answer(base.text, text) or float(kl.mean()) < KEEP_KL
                    agree += same
                    total, count = total + float(kl.sum()), count + kl.numel()
                    rows.append({"step": step, "prompt": question, "base_answer": base.text, "answer": text,
                                 "kl": float(kl.mean()), "agrees": same})
        agreement = agree / len(self.prompts)
        metrics = {"forgetting/kl": total / max(count, 1), "forgetting/answer_agreement": agreement}
        return metrics, rows, self._warning(step, agreement, rows)

    def _warning(self, step: int, agreement: float, rows: list[dict]) -> Optional[str]:
        if agreement >= self.min_agreement:
            return None
        worst = max(rows, key=lambda r: r["kl"])
        return (f"warning: the model is forgetting: after step {step} only {agreement:.0%} of the forgetting "
                f"probe's answers match the base model's (forgetting/answer_agreement < "
                f"{self.min_agreement:g}, data.forgetting_probe_min_agreement). Changed most (KL "
                f"{worst['kl']:.2f}): {worst['prompt']!r}: before {worst['base_answer'].strip()!r}, now "
                f"{worst['answer'].strip()!r}. Lower train.lr, mix in generic data (recipe=replay_1to1), or stop "
                f"earlier (forgetting_probe.jsonl has every answer)")

    def run(self, model, step: int, *, lora: bool) -> tuple[dict[str, float], list[dict], Optional[str]]:
        """The probe at an eval after ``step`` (0: before training, where the base is recorded).

        A run resumed without a base record (a checkpoint from before the probe, or made on other prompts)
        records it from the adapter-disabled model under LoRA; a full fine-tune cannot, and goes without.
        """
        if self.base is None and (step == 0 or lora):
            self.record_base(model)
        if self.base is None:
            if self.off_reason is None:
                self.off_reason = ("note: no forgetting probe record of the base model in this run's checkpoint "
                                   "(made at step 0 of a full fine-tune): forgetting/* is not reported")
                return {}, [], self.off_reason
            return {}, [], None
        if step == 0:
            return {"forgetting/kl": 0.0, "forgetting/answer_agreement": 1.0}, [], None
        return self.measure(model, step)


def prompt_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """A probe's prompt tokens: the chat template with its generation prompt, or for a tokenizer without one
    a plain ``Question: ... Answer:`` text."""
    if tokenizer.chat_template:
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                  return_dict=True)["input_ids"])
    question = "\n".join(m["content"] for m in messages)
    return list(tokenizer(f"Question: {question}\nAnswer:")["input_ids"])


def build_probe(data, *, pretrained: bool, tokenizer, synced: bool) -> Optional[ForgettingProbe]:
    """The run's forgetting probe from ``data.forgetting_probe`` (a ``DataConfig``), or None when it is off.

    Raises:
        DataError: a probe file that is missing or holds a record that is not a prompt (before any model
            loads).
    """
    from sftdist.data.probes import probe_conversations
    from sftdist.observe.samples import stop_token_ids

    conversations = probe_conversations(data.forgetting_probe, pretrained=pretrained)
    if not conversations:
        return None
    return ForgettingProbe([prompt_ids(tokenizer, c) for c in conversations], [c[-1]["content"] for c in conversations],
                           tokenizer, stop_token_ids(tokenizer),
                           max_new_tokens=data.forgetting_probe_max_new_tokens,
                           min_agreement=data.forgetting_probe_min_agreement, synced=synced)
