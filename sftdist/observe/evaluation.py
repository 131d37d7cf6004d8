"""Eval passes, the step-0 baseline they are compared with, and early stopping.

Every eval pass gives ``eval_loss`` and ``eval_loss/<source>`` (token-weighted, over every source's eval
split). The pass before the first step is the baseline: later passes add ``eval_loss_delta`` and
``eval_loss_delta/<source>``, their change since step 0. For a generic (replay) source that change is the
forgetting curve: a rise means the model is losing general ability while it learns the task. It cannot show
everything: training on the replay set also improves its held-out loss. The forgetting probe
(``forgetting.py``: ``forgetting/kl``, ``forgetting/answer_agreement``) compares answers to prompts that are never
trained on with the base model's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from sftdist.config import EarlyStoppingConfig
from sftdist.data.build import TrainData, make_batch
from sftdist.data.tokenize import IGNORE_INDEX
from sftdist.engine import sequence_parallel
from sftdist.engine.distributed import all_reduce_sum, device, log
from sftdist.engine.forward import LossHead, device_batch
from sftdist.engine.loss import at_supervised, per_source_sums


def per_source_metrics(prefix: str, names: list[str], sums: list[float]) -> dict[str, float]:
    """``{loss/<name>: ..., supervised_tokens/<name>: ...}`` (``eval_`` versions for prefix ``eval_loss``)
    from a ``per_source_sums`` vector summed over ranks.

    Example:
        >>> per_source_metrics("eval_loss", ["chat", "web"], [6.0, 0.0, 3.0, 0.0])
        {'eval_loss/chat': 2.0, 'eval_supervised_tokens/chat': 3, 'eval_loss/web': None, 'eval_supervised_tokens/web': 0}
    """
    out = {}
    for i, name in enumerate(names):
        count = sums[len(names) + i]
        out[f"{prefix}/{name}"] = sums[i] / count if count else None
        out[f"{prefix.removesuffix('loss')}supervised_tokens/{name}"] = int(count)
    return out


def evaluate(engine, data: TrainData, *, micro_batch_size: int, pad_id: int, head: LossHead) -> dict[str, float]:
    """Token-weighted loss on every source's eval split, overall and per source.

    Every rank runs the same number of forward passes (ZeRO-3 gathers parameters collectively), padding
    its share with a masked-out repeat of a record when the split does not divide evenly.
    """
    rank_, world, dev = sequence_parallel.dp_rank(), sequence_parallel.dp_world(), device()
    names, num = data.names, len(data.sources)
    sums = torch.zeros(2 * num, dtype=torch.float64, device=dev)
    samples = [(s, i) for s, src in enumerate(data.sources) if src.eval is not None for i in range(len(src.eval))]
    per_rank = -(-len(samples) // world)
    mine = samples[rank_ * per_rank:(rank_ + 1) * per_rank]
    mine += [None] * (per_rank - len(mine))  # placeholders keep forward counts equal across ranks
    engine.eval()
    with torch.no_grad():
        for start in range(0, per_rank, micro_batch_size):
            chunk = mine[start:start + micro_batch_size]
            batch = make_batch(data, [[c or samples[0]] for c in chunk], pad_id, packed=False, split="eval")
            batch["targets"][[i for i, c in enumerate(chunk) if c is None]] = IGNORE_INDEX
            batch = device_batch(sequence_parallel.local_batch(batch, pad_id), dev)
            losses, supervised = head.losses(engine, batch)
            sums += per_source_sums(losses, at_supervised(batch["token_source"], supervised), num)
    engine.train()
    totals = all_reduce_sum(sums.tolist())
    loss = sum(totals[:num]) / max(sum(totals[num:]), 1)
    return {"eval_loss": loss, **per_source_metrics("eval_loss", names, totals)}


def loss_keys(row: dict) -> dict[str, float]:
    """The eval losses of a row that have a value: ``eval_loss`` and ``eval_loss/<source>``."""
    return {k: v for k, v in row.items() if (k == "eval_loss" or k.startswith("eval_loss/")) and v is not None}


def eval_deltas(row: dict, baseline: dict[str, float]) -> dict[str, float]:
    """``eval_loss_delta[/<source>]``: each eval loss minus its step-0 value.

    Example:
        >>> eval_deltas({"eval_loss": 1.5, "eval_loss/web": 2.25, "eval_loss/chat": None},
        ...             {"eval_loss": 2.0, "eval_loss/web": 2.0, "eval_loss/chat": 1.0})
        {'eval_loss_delta': -0.5, 'eval_loss_delta/web': 0.25}
    """
    return {k.replace("eval_loss", "eval_loss_delta", 1): v - baseline[k]
            for k, v in loss_keys(row).items() if k in baseline}


@dataclass
class EvalTracker:
    """What eval passes remember across steps (and, through the checkpoint, across a resume): the step-0
    baseline and the early-stopping state.

    ``observe`` is called with the metrics of every eval pass after step 0. It adds the deltas and says
    whether this pass is the best so far and whether the run should stop.
    """

    early: EarlyStoppingConfig
    baseline: dict[str, float] = field(default_factory=dict)
    best_value: Optional[float] = None
    best_step: Optional[int] = None
    evals_since_best: int = 0
    probe_base: Optional[dict] = None  # the forgetting probe's record of the base model (ForgettingProbe.state)

    @classmethod
    def from_state(cls, early: EarlyStoppingConfig, state: Optional[dict]) -> "EvalTracker":
        """Restore a tracker saved with ``state()`` (a checkpoint's ``eval`` entry); a fresh one without."""
        state = state or {}
        keep = state.get("early_stopping_metric") == early.metric  # a changed metric starts its count over
        return cls(early, dict(state.get("baseline", {})), state.get("best_value") if keep else None,
                   state.get("best_step") if keep else None, state.get("evals_since_best", 0) if keep else 0,
                   state.get("forgetting_probe"))

    def state(self) -> dict:
        return {"baseline": self.baseline, "early_stopping_metric": self.early.metric, "best_value": self.best_value,
                "best_step": self.best_step, "evals_since_best": self.evals_since_best,
                **({"forgetting_probe": self.probe_base} if self.probe_base else {})}

    @property
    def enabled(self) -> bool:
        return self.early.patience > 0

    def set_baseline(self, row: dict) -> dict[str, float]:
        """Record the step-0 eval; returns its (zero) deltas for the step-0 row."""
        self.baseline = loss_keys(row)
        return eval_deltas(row, self.baseline)

    def observe(self, step: int, row: dict) -> tuple[dict[str, float], bool, Optional[str]]:
        """``(deltas, improved, stop_reason)`` for the eval pass after ``step``.

        Example (patience 2):
            >>> t = EvalTracker(EarlyStoppingConfig(patience=2, min_delta=0.1))
            >>> [t.observe(s, {"eval_loss": v})[1:] for s, v in [(10, 2.0), (20, 1.95), (30, 1.5), (40, 1.6), (50, 1.7)]]
            ... # doctest: +NORMALIZE_WHITESPACE
            [(True, None), (False, None), (True, None), (False, None),
             (False, 'eval_loss did not improve by more than 0.1 for 2 evals (best 1.5 at step 30)')]
        """
        deltas = eval_deltas(row, self.baseline) if self.baseline else {}
        if not self.enabled:
            return deltas, False, None
        value = {**row, **deltas}.get(self.early.metric)
        if value is None:  # e.g. a source with no eval tokens this time: neither better nor worse
            return deltas, False, None
        if self.best_value is None or value < self.best_value - self.early.min_delta:
            self.best_value, self.best_step, self.evals_since_best = value, step, 0
            return deltas, True, None
        self.evals_since_best += 1
        if self.evals_since_best >= self.early.patience:
            return deltas, False, (f"{self.early.metric} did not improve by more than {self.early.min_delta:g} for "
                                   f"{self.evals_since_best} evals (best {self.best_value:.4g} at step {self.best_step})")
        return deltas, False, None


@dataclass
class EvalPlan:
    """When the loop evaluates, and what an eval pass does: losses on the eval splits (when there are any),
    their deltas since step 0 and the early-stopping verdict, the forgetting probe (``data.forgetting_probe``),
    and sample generations (``logging.samples``)."""

    every: int  # train.eval_every (0: only after the last step)
    at_start: bool  # also before the first step: the baseline
    tracker: EvalTracker
    has_eval: bool  # some source has an eval split
    micro_batch_size: int
    pad_id: int
    prompts: list = field(default_factory=list)  # samples.SamplePrompt
    tokenizer: object = None
    sample_tokens: int = 64
    synced: bool = False  # generation keeps ranks in step (ZeRO-3 on several ranks)
    probe: object = None  # forgetting.ForgettingProbe, when data.forgetting_probe gives prompts
    lora: bool = False  # an adapter is trained: the probe's base is the model with it disabled

    def due(self, step: int, last: bool) -> bool:
        """Is there an eval pass after optimizer step ``step`` (1-based; 0 = before training)?"""
        if not (self.has_eval or self.prompts or self.probe):
            return False
        if step == 0:  # the probe records the base model before the first step, even without a step-0 eval
            return self.at_start or (self.probe is not None and self.probe.base is None)
        return last or bool(self.every and step % self.every == 0)

    def run(self, engine, data: TrainData, head: LossHead, *, step: int, metrics) -> tuple[dict, bool, Optional[str]]:
        """One eval pass after ``step``: ``(metrics row entries, improved, stop_reason)``; every rank calls it."""
        from sftdist.observe.samples import generate_samples

        row: dict = {}
        improved, stop = False, None
        evaluating = step > 0 or self.at_start
        if self.has_eval and evaluating:
            row = evaluate(engine, data, micro_batch_size=self.micro_batch_size, pad_id=self.pad_id, head=head)
            if step == 0:
                row |= self.tracker.set_baseline(row)
            else:
                deltas, improved, stop = self.tracker.observe(step, row)
                row |= deltas
        if self.probe is not None:
            row |= self.run_probe(engine, step, metrics)
        if self.prompts and evaluating:
            metrics.write_samples(generate_samples(engine, self.tokenizer, self.prompts, step=step,
                                                   max_new_tokens=self.sample_tokens, synced=self.synced))
        return row, improved, stop

    def run_probe(self, engine, step: int, metrics) -> dict[str, float]:
        """The forgetting probe's metrics after ``step``; its answers go to ``forgetting_probe.jsonl``."""
        model = getattr(engine, "module", engine)
        was_training = model.training
        model.eval()  # no dropout in the answers or the distributions
        with torch.random.fork_rng(devices=[]):  # the probe must not move the training RNG
            entries, rows, note = self.probe.run(model, step, lora=self.lora)
        model.train(was_training)
        self.tracker.probe_base = self.probe.state()
        metrics.write_probe_answers(rows)
        if note:
            log(note)
        return entries
