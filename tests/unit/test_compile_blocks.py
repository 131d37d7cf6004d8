"""Compiled decoder blocks (sftdist/engine/compiled.py): the same losses and gradients as eager on packed batches
of two widths, and the second width compiles nothing new. The default run traces with AOT autograd
(``aot_eager``: the graphs, guards and recompiles of a real compile, in ~2 s); inductor's own kernels, ~35 s of
compiling on a cold cache, are the ``slow`` variant."""

import pytest
import torch
from torch._dynamo.utils import counters

from sftdist.data.collate import collate_packed
from sftdist.data.tokenize import IGNORE_INDEX
from sftdist.engine import attention
from sftdist.engine.compiled import compile_blocks, decoder_layers
from sftdist.engine.forward import supervised_losses


def tiny_llama():
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("llama", vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    return attention.use_for(model, "sdpa", 128)


def packed_batch(lengths_per_row: list[list[int]], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for lengths in lengths_per_row:
        rows.append([])
        for n in lengths:
            ids = torch.randint(1, 97, (n,), generator=g).tolist()
            rows[-1].append({"input_ids": ids, "labels": [IGNORE_INDEX] * 2 + ids[2:]})
    return collate_packed(rows, 0)


def losses_and_grads(model, batch):
    model.zero_grad()
    losses, _ = supervised_losses(model, batch)
    losses.sum().backward()
    return losses.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_blocks_match_eager_and_keep_one_graph_across_widths(backend):
    # Two widths (37 and 52), several documents per row, a padding tail on the shorter rows.
    batches = [packed_batch([[9, 14, 11, 3], [20, 17]], seed=1), packed_batch([[25, 27], [6, 30, 10], [51]], seed=2)]
    model = tiny_llama()
    eager = [losses_and_grads(model, b) for b in batches]
    torch._dynamo.reset()
    print(compile_blocks(model, backend=backend))
    counters.clear()
    got = [losses_and_grads(model, batches[0])]
    graphs_after_first_width = counters["stats"]["unique_graphs"]
    got.append(losses_and_grads(model, batches[1]))
    assert graphs_after_first_width > 0  # the blocks did compile
    assert counters["stats"]["unique_graphs"] == graphs_after_first_width, "the second width compiled again"
    for (ref, ref_grads), (losses, grads) in zip(eager, got):
        torch.testing.assert_close(losses, ref, rtol=1e-5, atol=1e-6)
        for name, grad in ref_grads.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_lora_with_checkpointing_through_compiled_blocks():
    """The layers are found under PEFT, transformers' checkpointing still recomputes them (around the compiled
    code), and compiling twice changes nothing. Dynamo's ``eager`` backend: the wrapping, not inductor."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    layers = decoder_layers(model)
    assert layers is model.get_base_model().model.layers
    batches = [packed_batch([[9, 14, 11, 3], [20, 17]], seed=1), packed_batch([[25, 27], [6, 30, 10]], seed=2)]
    eager = [losses_and_grads(model, b) for b in batches]
    torch._dynamo.reset()
    compile_blocks(model, backend="eager")
    forwards = [layer.forward for layer in layers]
    assert "2 x LlamaDecoderLayer compiled" in compile_blocks(model, backend="eager")
    assert [layer.forward for layer in layers] == forwards
    counters.clear()
    for batch, (ref, ref_grads) in zip(batches, eager):
        losses, grads = losses_and_grads(model, batch)
        torch.testing.assert_close(losses, ref, rtol=1e-5, atol=1e-6)
        for name, grad in ref_grads.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)
    assert counters["stats"]["unique_graphs"] > 0
    assert compile_blocks(torch.nn.Linear(2, 2)).startswith("train.compile: no decoder layers found")
