#!/bin/bash
# Learning-rate sweeps with Hydra multirun. Each point trains in its own run directory,
# <hydra.sweep.dir>/<job num>/, with W&B group = the sweep directory's name and run name = its overrides.
#   bash launch/sweep_lr.sh
set -euo pipefail
SWEEP=multirun/lr-sweep    # EDIT
# Locally, one point after another (the preset sweeps train.lr over 1e-5, 2e-5, 5e-5; LoRA: +sweep=lora_lr):
#   sftdist-train -m +sweep=lr hydra.sweep.dir="$SWEEP"
# On SLURM, one job per point (a job array), with the resources of the launch group:
sftdist-train -m +sweep=lr hydra/launcher=slurm hydra.sweep.dir="$SWEEP" \
  launch.partition=gpu launch.gpus_per_node=8 launch.nproc_per_node=8 launch.time=08:00:00 \
  model=qwen2_5_7b parallelism=zero3
# The table (Markdown and CSV), the loss curves of every point (PNG) and the best point:
sftdist-sweep-report "$SWEEP"
