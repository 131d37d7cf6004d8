"""Check sftdist-plan's arithmetic (``sftdist/engine/memory_plan.py``) against measurements on this machine.

1. Model states: the planner's params + grads + optimizer per rank against the measured 2-rank fp32 CPU runs
   recorded by ``bench/zero_memory.py`` in ``bench/RESULTS.md`` (numbers copied below).
2. Activations: the planner's estimate (``sftdist/engine/activation_memory.py``) against the bytes of the
   tensors autograd saves for backward (``torch.autograd.graph.saved_tensors_hooks``, each storage counted
   once, parameters excluded) in one forward of a Llama model (hidden 512, 8 layers, 8 heads / 4 KV heads,
   intermediate 1408) on CPU, fp32, micro-batch 2 x 256 tokens. Under activation checkpointing only the
   checkpoints' inputs are saved in forward; the layer recomputed in backward is not seen, so that row
   compares inputs.

Usage (repository root, project venv; ~20 s on 2 cores)::

    python bench/plan_check.py
"""

from __future__ import annotations

import torch

from sftdist.engine.activation_memory import activation_bytes
from sftdist.engine.memory_plan import ModelShape, Setup, model_states

MIB = 2**20
# bench/RESULTS.md, "ZeRO per-rank memory", run 2026-11-25: params+grads+optimizer MiB (larger rank)
MEASURED = {("tiny", 869_504): {0: 13.3, 2: 10.7, 3: 9.7},
            ("llama-h512-l8", 24_125_952): {0: 368.1, 2: 279.9, 3: 275.1}}


def model_state_rows() -> None:
    print("| model | ZeRO | planner MiB | measured MiB | error |\n|---|---:|---:|---:|---:|")
    for (name, n), stages in MEASURED.items():
        shape = ModelShape(params=n, trainable=n, quantized=0, largest_module=0, layers=1, hidden=1, heads=1,
                           vocab=1)
        for stage, measured in stages.items():
            states = model_states(shape, Setup(zero_stage=stage, world=2, precision="fp32"))
            ours = sum(dev for dev, _ in states.values()) / MIB
            error = 100 * (ours - measured) / measured
            print(f"| {name} | {stage} | {ours:.1f} | {measured:.1f} | {error:+.1f}% |")


def saved_bytes(model, input_ids) -> int:
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.model(input_ids)
    return sum(v for k, v in seen.items() if k not in params)


def activation_rows(b: int = 2, s: int = 256) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    print("\n| attention | checkpointing | planner MiB | saved in forward MiB | error |")
    print("|---|---|---:|---:|---:|")
    shape = ModelShape(params=0, trainable=0, quantized=0, largest_module=0, layers=8, hidden=512, heads=8,
                       vocab=1024, intermediate=1408)
    for attn in ("sdpa", "eager"):
        for ckpt in (False, True):
            cfg = LlamaConfig(hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                              num_attention_heads=8, num_key_value_heads=4, vocab_size=1024,
                              attn_implementation=attn, use_cache=False)
            model = LlamaForCausalLM(cfg).train()
            if ckpt:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            measured = saved_bytes(model, torch.randint(0, 1024, (b, s)))
            kw = dict(micro_batch=b, seq=s, precision="fp32", fused_attention=attn != "eager")
            est = activation_bytes(shape, checkpointing=ckpt, **kw)
            if ckpt:  # forward saves only the layer inputs; the recomputed layer lives during backward
                est -= activation_bytes(shape, checkpointing=False, **kw) / shape.layers
            print(f"| {attn} | {'inputs only' if ckpt else 'off'} | {est / MIB:.1f} | {measured / MIB:.1f} | "
                  f"{100 * (est - measured) / measured:+.0f}% |")


if __name__ == "__main__":
    model_state_rows()
    activation_rows()
