"""Per-step throughput, utilisation and memory metrics: what tells a user whether the hardware is busy.

Everything here is counted on the host from the collated batches before they move to the device, and
summed over ranks by the one all-reduce the step already does for its supervised-token count, so the
metrics add no host-device synchronisation to the micro-batch loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from sftdist.engine.distributed import all_reduce_sum, has_gpu
from sftdist.engine.loss import supervised_samples
from sftdist.observe.flops import (
    FlopsModel,
    attention_work,
    flops_model,
    measured_matmul_peak,
    peak_flops_per_device,
)

GIB = 2 ** 30


def batch_counts(batches: list[dict[str, torch.Tensor]]) -> list[int]:
    """``[supervised, tokens, slots, attention_work, supervised_samples]`` of this rank's micro-batches:
    supervised positions, non-padding tokens, all token slots (padding included), the sum of squared
    document lengths, and the samples with a supervised position (``train.loss_normalization=sequence``
    divides by their sum over ranks).

    Example:
        >>> b = {"targets": torch.tensor([[5, -100, 7, -100]]), "token_source": torch.tensor([[0, 0, 1, -1]]),
        ...      "input_ids": torch.tensor([[1, 2, 3, 0]]), "position_ids": torch.tensor([[0, 1, 0, 0]]),
        ...      "sample_index": torch.tensor([[0, 0, 1, -1]])}
        >>> batch_counts([b, b])
        [4, 6, 8, 10, 4]
    """
    supervised = sum(int((b["targets"] != -100).sum()) for b in batches)
    tokens = sum(int((b["token_source"] >= 0).sum()) for b in batches)
    slots = sum(b["input_ids"].numel() for b in batches)
    work = sum(attention_work(b["position_ids"], b["token_source"]) for b in batches)
    return [supervised, tokens, slots, work, sum(supervised_samples(b) for b in batches)]


def device_peak_flops(precision: str, override: Optional[float]) -> tuple[Optional[float], str]:
    """This rank's peak FLOP/s and where the number comes from: ``logging.peak_flops``, the accelerator
    table (dense bf16/fp16), or on CPU a short fp32 matmul measurement. None when unknown (fp32 on a GPU,
    an accelerator the table lacks)."""
    if override:
        return override, "logging.peak_flops"
    if has_gpu():
        name = torch.cuda.get_device_name()
        peak = peak_flops_per_device(name, precision)
        return peak, (f"{name}, dense {precision}" if peak else f"{name} ({precision}) is not in the peak table; "
                      f"set logging.peak_flops")
    with torch.random.fork_rng(devices=[]):  # its random matrices must not shift the run's RNG (exact resume)
        return measured_matmul_peak(), "measured fp32 matmul on this CPU"


@dataclass
class StepMeter:
    """Turns a step's counts and wall time into its metrics row entries.

    Args:
        flops: The model's FLOPs per step (None: no mfu).
        peak_flops: All ranks' peak FLOP/s together (None: no mfu).
        head_everywhere: The LM head runs at every token (``train.lm_head=full``), not only at supervised ones.
    """

    flops: Optional[FlopsModel]
    peak_flops: Optional[float]
    head_everywhere: bool

    @classmethod
    def build(cls, model, *, precision: str, peak_override: Optional[float], head_everywhere: bool
              ) -> tuple["StepMeter", str]:
        """Every rank must call this (its peak is summed over ranks). Returns the meter and a line saying
        what the peak is."""
        peak, source = device_peak_flops(precision, peak_override)
        known, total = all_reduce_sum([float(peak is not None), peak or 0.0])
        world = int(all_reduce_sum([1.0])[0])
        cluster = total if known == world else None  # one unknown rank makes the sum meaningless
        try:
            flops = flops_model(model)
        except (AttributeError, TypeError) as e:  # a model without the usual HF structure
            flops, source = None, f"FLOPs unknown for this model ({e})"
        note = (f"mfu: peak {cluster / 1e12:.3g} TFLOP/s over {world} rank(s) ({source})" if cluster and flops
                else f"mfu: not logged ({source})")
        return cls(flops, cluster, head_everywhere), note

    def metrics(self, *, supervised: int, tokens: int, slots: int, attention: int, seconds: float) -> dict:
        """``step_time_s``, ``tokens_per_sec``, ``supervised_tokens_per_sec``, ``padding_fraction``,
        ``model_flops`` and ``mfu`` of one step (all ranks), plus ``mem/...`` of this rank."""
        seconds = max(seconds, 1e-9)
        row = {"step_time_s": seconds, "tokens_per_sec": tokens / seconds,
               "supervised_tokens_per_sec": supervised / seconds, "padding_fraction": 1 - tokens / max(slots, 1)}
        if self.flops is not None:
            flops = self.flops.step_flops(tokens, attention, tokens if self.head_everywhere else supervised)
            row["model_flops"] = flops
            row["mfu"] = flops / seconds / self.peak_flops if self.peak_flops else None
        return row | memory_metrics()


def memory_metrics() -> dict[str, float]:
    """``mem/host_rss_gib`` of this process, ``mem/host_peak_rss_gib`` (the most it has held since it started,
    the data stage included) and, on a GPU, ``mem/device_{allocated,reserved,peak}_gib`` (peak: the most
    allocated since the run started)."""
    import resource

    import psutil

    rss = psutil.Process().memory_info().rss
    # (the kernel's high-water mark, in KiB, trails the current RSS by a few pages it has not synced yet)
    row = {"mem/host_rss_gib": rss / GIB,
           "mem/host_peak_rss_gib": max(rss, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / GIB}
    if has_gpu():
        row |= {"mem/device_allocated_gib": torch.cuda.memory_allocated() / GIB,
                "mem/device_reserved_gib": torch.cuda.memory_reserved() / GIB,
                "mem/device_peak_gib": torch.cuda.max_memory_allocated() / GIB}
    return row
