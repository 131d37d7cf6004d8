"""sftdist-plan against a real run: the planner's per-rank total for a CPU run (``--device cpu``) is within
15% of the peak resident memory of a short LoRA run of a Llama shape big enough that the runtime does not
dominate (hidden 512, 8 layers, 2 x 512 packed tokens; ~1.5 GiB). Before the planner told CPUs apart it was
28% high here (whole reduction buckets), and without its runtime, freed-memory or LoRA-dropout term it is
23-35% low (issue item 7: 60% off on a 135M model); ``bench/plan_rss.py`` measures the 135M shape under
full fine-tuning, LoRA and ZeRO-3."""

from __future__ import annotations

import sys
from types import SimpleNamespace

from tests.conftest import run_cmd

SHAPE = ["model.from_config.hidden_size=512", "model.from_config.intermediate_size=1408",
         "model.from_config.num_hidden_layers=8", "model.from_config.num_attention_heads=8",
         "model.from_config.num_key_value_heads=4"]
RUN = ["peft=lora", "parallelism=zero2", "train.max_length=512", "train.micro_batch_size=2",
       "train.global_batch_size=2", "train.max_steps=2", "train.warmup_steps=0", "train.lr=1e-4",
       "data.packing=true", "data.sources.0.max_samples=120", "data.sources.1.max_samples=20"]
# sftdist.train.run in the forked process, then its peak resident set (VmHWM, KiB)
PEAK = ("import sys; from pathlib import Path; from sftdist.config import compose_config; "
        "from sftdist.train import run; run(compose_config(sys.argv[1:])); "
        "print('VmHWM', [line.split()[1] for line in Path('/proc/self/status').read_text().splitlines() "
        "if line.startswith('VmHWM:')][0])")


def test_plan_is_within_15_percent_of_a_lora_runs_peak_rss(tmp_path):
    from sftdist.config import compose_config
    from sftdist.tools.plan import build_plan

    overrides = [*SHAPE, *RUN, f"output_dir={tmp_path / 'run'}"]
    args = SimpleNamespace(world_size=1, precision=None, gpu_mem=None, no_data=True, tokens_per_sec=None,
                           metrics=None, device="cpu")
    plan = build_plan(compose_config(overrides), args)["rows"]["total"][0]
    proc = run_cmd([sys.executable, "-c", PEAK, *overrides])
    measured = int(proc.stdout.split("VmHWM")[-1].split()[0]) * 1024
    assert abs(plan - measured) <= 0.15 * measured, (plan / 2**30, measured / 2**30)
