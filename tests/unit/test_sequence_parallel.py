"""Sequence parallelism's pure parts: padding and sharding a collated batch, the checks that refuse a model or
a process count before any work, and the tiled MLP (the same values and gradients as the plain MLP). The
2-rank training runs are in tests/dist/test_sequence_parallel.py."""

import doctest

import pytest
import torch

import sftdist.engine.sequence_parallel as sp
import sftdist.engine.tiling as tiling
from sftdist.config import ConfigError, compose_config
from sftdist.data.collate import collate_packed
from sftdist.engine import attention
from sftdist.lifecycle import startup


def test_doc_examples():
    assert doctest.testmod(sp).failed == 0
    assert doctest.testmod(tiling).failed == 0


def packed_batch():
    rows = [[{"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "source": 1}, {"input_ids": [8, 9], "labels": [8, 9]}],
            [{"input_ids": [3, 4, 2, 2, 2, 2], "labels": [-100, 4, 2, 2, 2, 2]}]]
    return collate_packed(rows, pad_id=0)


@pytest.mark.parametrize("size", [2, 3, 4])
def test_shards_put_back_together_are_the_padded_batch(size):
    batch = packed_batch()
    padded = sp.pad_to_multiple(batch, size, pad_id=0)
    assert padded["input_ids"].shape[1] % size == 0
    shards = [sp.shard(batch, r, size, pad_id=0) for r in range(size)]
    for key in batch:
        assert torch.equal(torch.cat([s[key] for s in shards], dim=1), padded[key]), key
    # Every shard carries the whole rows' positions, so the document spans are those of the padded rows, and
    # the padding added never joins a real document.
    spans = attention.document_spans(shards[0][sp.FULL_POSITIONS].tolist())
    assert spans == attention.document_spans(padded["position_ids"].tolist())
    assert spans[0][:2] == [(0, 3), (3, 5)]
    # Nothing added is trained or counted as a token of any source.
    assert (padded["targets"] != -100).sum() == (batch["targets"] != -100).sum()
    assert (padded["token_source"] >= 0).sum() == (batch["token_source"] >= 0).sum()
    assert (padded["sample_index"] >= 0).sum() == (batch["sample_index"] >= 0).sum()


def test_an_unpacked_batch_loses_its_attention_mask_and_keeps_its_padding_apart():
    from sftdist.data.collate import collate

    batch = collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8, 9], "labels": [8, 9]}], 0)
    local = sp.shard(batch, 0, 2, pad_id=0)
    assert "attention_mask" not in local
    assert attention.document_spans(local[sp.FULL_POSITIONS].tolist()) == [[(0, 3), (3, 4)], [(0, 2), (2, 4)]]


def test_without_sequence_parallelism_the_batch_is_untouched():
    sp.setup(1, rank=1, world=4)
    batch = packed_batch()
    assert sp.local_batch(batch, 0) is batch
    assert (sp.size(), sp.dp_rank(), sp.dp_world(), sp.mpu()) == (1, 1, 4, None)


def tiny_config(**changes):
    from transformers import AutoConfig

    shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=100)
    return AutoConfig.for_model(**{"model_type": "llama", **shape, **changes})


def test_model_problems_name_what_does_not_fit():
    assert sp.model_problem(tiny_config(), 2, "sdpa", 1024) is None
    assert sp.model_problem(tiny_config(), 4, "sdpa", 1024) is None  # 2 KV heads replicated to 4
    assert "3 attention heads" in sp.model_problem(tiny_config(hidden_size=48, num_attention_heads=3,
                                                               num_key_value_heads=1), 2, "sdpa", 1024)
    assert "6 key/value heads" in sp.model_problem(tiny_config(hidden_size=48, num_attention_heads=12,
                                                               num_key_value_heads=6), 4, "sdpa", 1024)
    assert "attn_implementation=eager" in sp.model_problem(tiny_config(), 2, "eager", 1024)
    gemma = tiny_config(model_type="gemma2", head_dim=16, sliding_window=512)
    assert "not plain causal attention" in sp.model_problem(gemma, 2, "sdpa", 4096)


def test_start_up_refuses_a_size_that_does_not_divide_the_processes_or_fit_the_model():
    cfg = compose_config(["parallelism.sequence_parallel_size=2"])
    assert startup.check_sequence_parallel(cfg, 4) == 2
    with pytest.raises(ConfigError, match=r"sequence_parallel_size=2 must divide the 3 process"):
        startup.check_sequence_parallel(cfg, 3)
    cfg = compose_config(["parallelism.sequence_parallel_size=8"])  # the tiny model has 4 heads
    with pytest.raises(ConfigError, match=r"sequence_parallel_size=8 does not fit this model: its 4 attention"):
        startup.check_sequence_parallel(cfg, 8)
    with pytest.raises(ConfigError, match="parallelism.sequence_parallel_size=0"):
        compose_config(["parallelism.sequence_parallel_size=0"])
    with pytest.raises(ConfigError, match="also set parallelism.activation_checkpointing=true"):
        compose_config(["parallelism.activation_checkpointing_offload=true"])
    assert compose_config(["parallelism.tiled_mlp=false"]).parallelism.tiled_mlp == "false"


def test_tiled_mlp_gives_the_plain_mlps_values_and_gradients():
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    plain = AutoModelForCausalLM.from_config(tiny_config())
    tiled = AutoModelForCausalLM.from_config(tiny_config())
    tiled.load_state_dict(plain.state_dict())
    assert tiling.tile_mlps(tiled) == 1 and tiling.tile_mlps(tiled) == 0  # (each MLP once)
    ids = torch.randint(0, 100, (2, 300))  # 300 positions over hidden 64: 5 tiles
    assert tiling.tile_count(300, 64) == 5
    for model in (plain, tiled):
        model.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
    torch.testing.assert_close(tiled(input_ids=ids).logits, plain(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    grads = {n: p.grad for n, p in plain.named_parameters()}
    for name, param in tiled.named_parameters():
        torch.testing.assert_close(param.grad, grads[name], rtol=1e-4, atol=1e-6, msg=name)
