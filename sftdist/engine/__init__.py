"""One optimizer step on N ranks.

- ``distributed``: the process group, rank helpers, collectives, rank 0's ``log()``.
- ``deepspeed_wrap``: the thin DeepSpeed layer: precision, the pure ``build_ds_config``, ZeRO-3 init, the wrap.
- ``build_locks``, ``prebuild_ops``: where DeepSpeed's JIT-built ops live; building them once at set-up.
- ``model``: the tokenizer and the causal LM a ``ModelConfig`` names. ``adapter``: LoRA / QLoRA.
- ``attention``: sdpa per packed document. ``forward``: the forward pass to per-token losses.
- ``sequence_parallel``: Ulysses sequence parallelism (groups, per-rank slices). ``tiling``: ALST's tiled MLP.
- ``loss``: cross-entropy, per-source sums, the scale for the global supervised-token mean.
- ``optim``: parameter groups and the learning-rate schedule.
- ``memory_plan``: per-rank memory from shapes alone (pure arithmetic), and a model's shape from its config;
  ``activation_memory``: what a micro-batch's forward keeps for backward (its activation term).
"""
