"""``python -m sftdist.engine.prebuild_ops``: compile the DeepSpeed ops a CPU run loads, once, at set-up time.

DeepSpeed JIT-compiles its ops on first use: on a fresh CPU environment the first run spends ~2 min
building ``deepspeed_shm_comm`` and ``fused_adam`` (and ``cpu_adam`` for an offloaded optimizer) before its
first step. ``make setup`` runs this module so that the demo, the tests and the first real run start at
once. The ops are built exactly as a run builds them, by doing what a run does on a one-process group: the
same process-group start and the same ``build_ds_config`` / ``wrap_with_deepspeed`` engines (ZeRO-2, and
ZeRO-3 with offload) on a one-layer model, into this environment's own directory
(``build_locks.use_env_extensions_dir``). A second call finds them built and returns in seconds.

On a GPU host nothing is built here: the CUDA ops depend on the card a job gets. Exit status 0 even when
a build fails (the message says so): a run then builds, or reports, the op itself.
"""

from __future__ import annotations

import sys
import time


def prebuild() -> list[str]:
    """Build the ops of a CPU run; returns the ZeRO stages whose engines started (and so had their ops)."""
    import torch

    from sftdist.config import ParallelConfig, TrainConfig
    from sftdist.engine.deepspeed_wrap import build_ds_config, wrap_with_deepspeed
    from sftdist.engine.distributed import init_distributed

    init_distributed()  # the shm all-reduce op
    started = []
    for name, parallel in (("zero2", ParallelConfig(zero_stage=2)),  # fused_adam
                           ("zero3_offload", ParallelConfig(zero_stage=3, offload_optimizer=True,
                                                            offload_params=True))):  # cpu_adam
        model = torch.nn.Linear(8, 8)
        ds_config = build_ds_config(parallel, TrainConfig(micro_batch_size=1, global_batch_size=1, lr=1e-5), dp_world=1,
                                    precision="fp32", gpu=False)
        wrap_with_deepspeed(model, [{"params": list(model.parameters())}], ds_config, lambda step: 1.0)
        started.append(name)
    return started


def main() -> None:
    import torch

    if torch.cuda.is_available():
        print("sftdist-prebuild-ops: a GPU host; DeepSpeed builds its CUDA ops on first use")
        return
    start = time.time()
    try:
        stages = prebuild()
    except Exception as e:  # noqa: BLE001 - set-up goes on; the first run builds or reports the op itself
        print(f"sftdist-prebuild-ops: warning: could not prebuild DeepSpeed's ops ({type(e).__name__}: {e}); "
              f"the first run builds them", file=sys.stderr)
        return
    from sftdist.engine.build_locks import extensions_root

    print(f"sftdist-prebuild-ops: DeepSpeed's CPU ops for {', '.join(stages)} are built in {extensions_root()} "
          f"({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
