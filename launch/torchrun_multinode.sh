#!/bin/bash
# Multi-node torchrun without a scheduler: run this same script on every node, in any order (c10d rendezvous
# at node1:29400; the first node to arrive hosts it). Edit NODES, ENDPOINT and the run; output_dir must be on
# storage every node sees.
#   bash launch/torchrun_multinode.sh
set -euo pipefail
NODES=2                    # EDIT
ENDPOINT=node1:29400       # EDIT: a host every node can reach, and a free port there
sftdist-launch launch=torchrun launch.nnodes="$NODES" launch.rdzv_endpoint="$ENDPOINT" \
  launch.nproc_per_node=8 model=qwen2_5_7b parallelism=zero3 output_dir=/shared/runs/qwen7b-sft
