"""Profile one sftdist training step (forward + backward, no optimizer) of a bench preset on a packed batch.

    python bench/profile_step.py --preset small                      # sftdist as it trains
    python bench/profile_step.py --preset small --attention sdpa     # transformers' masked sdpa instead
    python bench/profile_step.py --preset micro --loss torch         # F.cross_entropy instead

It prints the best step time of 3 and the torch profiler's table of operators by self CPU time. The batch is
8 rows of 512 tokens, each row three documents of 200, 180 and 132 tokens, ~90% of positions supervised (as
in alpaca), random tokens.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    from train_vs_trl import model_config
    from transformers import AutoConfig, AutoModelForCausalLM

    import sftdist.engine.forward
    from sftdist.engine import attention
    from sftdist.engine.forward import supervised_losses

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small", choices=["micro", "small"])
    ap.add_argument("--attention", default="by_document", choices=["by_document", "sdpa"])
    ap.add_argument("--loss", default="token", choices=["token", "torch"])
    ap.add_argument("--rows", type=int, default=20, help="rows of the operator table")
    args = ap.parse_args()

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**model_config(args.preset, 32000)),
                                             attn_implementation="sdpa")
    if args.attention == "by_document":
        attention.register()
        model.set_attn_implementation(attention.NAME)
    if args.loss == "torch":
        sftdist.engine.forward.token_cross_entropy = lambda logits, targets: torch.nn.functional.cross_entropy(
            logits, targets, reduction="none")
    rows, width = 8, 512
    position_ids = torch.cat([torch.arange(200), torch.arange(180), torch.arange(132)]).repeat(rows, 1)
    targets = torch.randint(0, 32000, (rows, width))
    targets[torch.rand(rows, width) > 0.9] = -100
    batch = {"input_ids": torch.randint(0, 32000, (rows, width)), "position_ids": position_ids, "targets": targets}

    def step():
        losses, _ = supervised_losses(model, batch)
        losses.sum().backward()

    step()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    print(f"{args.preset}, attention {args.attention}, loss {args.loss}: step {min(times):.2f} s (best of 3)")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
