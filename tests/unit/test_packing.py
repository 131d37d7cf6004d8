"""Best-fit-decreasing packing, the packed batch format, and the property packing rests on: a packed row gives
every example exactly the logits and loss it gets alone, under sdpa and eager attention."""

import doctest
import random

import pytest
import torch

import sftdist.data.packing
from sftdist.data.collate import collate, collate_packed
from sftdist.data.demo import demo_conversations
from sftdist.data.packing import pack
from sftdist.data.tokenize import encode_conversation
from sftdist.engine.loss import token_loss_sum


def best_fit_reference(lengths, max_len):
    """Quadratic best fit decreasing, written for clarity: the spec ``pack`` must match exactly."""
    bins, rooms = [], []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        fits = [b for b, room in enumerate(rooms) if room >= lengths[i]]
        if fits:
            b = min(fits, key=lambda b: (rooms[b], b))
            bins[b].append(i)
            rooms[b] -= lengths[i]
        else:
            bins.append([i])
            rooms.append(max_len - lengths[i])
    return bins


@pytest.mark.parametrize("lengths,max_len,expected", [
    ([3, 5, 4, 2, 4], 8, [[1, 0], [2, 4], [3]]),
    ([], 8, []),
    ([8, 8, 8], 8, [[0], [1], [2]]),
    ([1, 1, 1, 1, 1], 2, [[0, 1], [2, 3], [4]]),
    # 6 opens bin 0 (room 4), 5 opens bin 1 (room 5); 4 goes to bin 0 (tightest), then 3 and 2 to bin 1.
    ([2, 3, 4, 5, 6], 10, [[4, 2], [3, 1, 0]]),
    # Equal rooms: the earlier bin wins. Both bins have room 3 when the 3s arrive.
    ([7, 7, 3, 3], 10, [[0, 2], [1, 3]]),
    # Best fit, not first fit: the 1 skips bin 0 (room 2) for bin 1 (room 1, after 3 + 3).
    ([1, 5, 3, 3], 7, [[1], [2, 3, 0]]),
])
def test_pack_hand_written(lengths, max_len, expected):
    assert pack(lengths, max_len) == expected


def test_pack_matches_reference_and_invariants():
    rng = random.Random(0)
    for _ in range(500):
        max_len = rng.randint(1, 50)
        lengths = [rng.randint(1, max_len) for _ in range(rng.randint(0, 40))]
        bins = pack(lengths, max_len)
        assert bins == best_fit_reference(lengths, max_len)
        assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
        assert all(b and sum(lengths[i] for i in b) <= max_len for b in bins)
        assert pack(list(lengths), max_len) == bins  # deterministic


@pytest.mark.parametrize("lengths,max_len,match", [
    ([3, 9, 2], 8, "example 1 has length 9"),
    ([3, 0], 8, "example 1 has length 0"),
    ([1], 0, "max_len"),
])
def test_pack_rejects_bad_lengths(lengths, max_len, match):
    with pytest.raises(ValueError, match=match):
        pack(lengths, max_len)


def test_pack_200k_items_efficiently():
    rng = random.Random(1)
    max_len = 4096
    lengths = [rng.randint(1, max_len // 4) for _ in range(200_000)]
    bins = pack(lengths, max_len)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert max(sum(lengths[i] for i in b) for b in bins) <= max_len
    assert sum(lengths) / (len(bins) * max_len) >= 0.95


def test_packing_docstring_example():
    result = doctest.testmod(sftdist.data.packing)
    assert result.attempted > 0 and result.failed == 0


def test_collate_packed_hand_written():
    rows = [[{"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "source": 1},
             {"input_ids": [8, 9], "labels": [8, 9], "source": 2}],
            [{"input_ids": [3, 4], "labels": [-100, 4]}],
            [{"input_ids": [1], "labels": [1]}, {"input_ids": [2], "labels": [2]},
             {"input_ids": [4, 5], "labels": [-100, 5], "source": 3}]]
    batch = collate_packed(rows, pad_id=0)
    # no attention_mask
    assert set(batch) == {"input_ids", "position_ids", "targets", "token_source", "sample_index"}
    assert {k: v.tolist() for k, v in batch.items()} == {
        "input_ids": [[5, 6, 7, 8, 9], [3, 4, 0, 0, 0], [1, 2, 4, 5, 0]],
        "position_ids": [[0, 1, 2, 0, 1], [0, 1, 0, 1, 2], [0, 0, 0, 1, 0]],
        # 7 does not predict 8, and 1 does not predict 2: each example's last position is -100.
        "targets": [[6, 7, -100, 9, -100], [4, -100, -100, -100, -100], [-100, -100, 5, -100, -100]],
        "token_source": [[1, 1, 1, 2, 2], [0, 0, -1, -1, -1], [0, 0, 3, 3, -1]],
        # the examples of the whole micro-batch numbered row by row; -1 on padding
        "sample_index": [[0, 0, 0, 1, 1], [2, 2, -1, -1, -1], [3, 4, 5, 5, -1]],
    }
    assert all(v.dtype == torch.long for v in batch.values())


def test_collate_packed_rejects_mismatched_labels():
    with pytest.raises(ValueError, match="3 input_ids but 2 labels"):
        collate_packed([[{"input_ids": [1, 2, 3], "labels": [1, 2]}]], pad_id=0)


def test_flattened_rows_give_flash_attention_the_example_boundaries():
    """flash_attention_2 reads packing from position_ids only for one row: flattening [B, T] to [1, B*T] must
    still start a sequence at every example and at every padding tail."""
    from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

    rows = [[{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [8, 9], "labels": [8, 9]}],
            [{"input_ids": [3, 4], "labels": [3, 4]}]]
    positions = collate_packed(rows, pad_id=0)["position_ids"].view(1, -1)
    (cu_seqlens, _), (max_len, _) = prepare_fa_kwargs_from_position_ids(positions)
    assert cu_seqlens.tolist() == [0, 3, 5, 7, 10] and int(max_len) == 3


def test_build_model_turns_the_cache_off(demo_tokenizer):
    """transformers detects packing from position_ids only when no cache is passed; a model whose config
    has use_cache=True makes a DynamicCache in every forward and silently attends across examples."""
    from sftdist.config import ModelConfig
    from sftdist.engine.model import build_model

    cfg = ModelConfig(tokenizer="builtin:demo", from_config={"model_type": "llama", "hidden_size": 32,
                      "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2})
    model = build_model(cfg, demo_tokenizer, precision="fp32", activation_checkpointing=False, seed=0)
    assert model.config.use_cache is False


# ----------------------------------------------------------------------------------------------------------
# Attention isolation on a real model.


def tiny_llama(tok, attn_implementation, use_cache=False):
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2,
        # With the default 0.02 the attention is nearly uniform and cross-talk moves the summed loss by only
        # ~2e-5 relative, below the tolerance; at 0.3 it moves it by ~2%, so the negative controls bite.
        initializer_range=0.3,
        use_cache=use_cache,  # build_model sets False: a cache disables transformers' packed-sequence detection
    )
    return transformers.LlamaForCausalLM._from_config(config, attn_implementation=attn_implementation).eval()


def real_examples(tok, n):
    """``n`` real tokenized conversations (single- and multi-turn, some with a system prompt)."""
    return [{**encode_conversation(tok, c["messages"]), "source": i % 3}
            for i, c in enumerate(demo_conversations()[:n])]


def packed_rows(examples):
    lengths = [len(e["input_ids"]) for e in examples]
    bins = pack(lengths, max_len=int(1.5 * max(lengths)))
    rows = [[examples[i] for i in b] for b in bins]
    width = max(sum(lengths[i] for i in b) for b in bins)
    # The test is only meaningful if some row holds several examples and some row is padded.
    assert any(len(b) > 1 for b in bins) and any(sum(lengths[i] for i in b) < width for b in bins)
    return bins, rows


@pytest.fixture(scope="module", params=["demo", "qwen2"])
def tokenizer(request, demo_tokenizer):
    if request.param == "demo":
        return demo_tokenizer
    shared = request.getfixturevalue("shared_dir")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(shared / "tokenizers" / "qwen2")


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_rows_equal_unpacked_examples(tokenizer, attn):
    examples = real_examples(tokenizer, 8)
    bins, rows = packed_rows(examples)
    model = tiny_llama(tokenizer, attn)
    packed = collate_packed(rows, tokenizer.pad_token_id)
    unpacked = collate(examples, tokenizer.pad_token_id)
    with torch.no_grad():
        packed_logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"]).logits
        unpacked_logits = model(input_ids=unpacked["input_ids"], attention_mask=unpacked["attention_mask"],
                                position_ids=unpacked["position_ids"]).logits
    packed_loss, packed_count = token_loss_sum(packed_logits, packed["targets"])
    ref_loss, ref_count = token_loss_sum(unpacked_logits, unpacked["targets"])
    assert int(packed_count) == int(ref_count) > 0
    torch.testing.assert_close(packed_loss, ref_loss, rtol=1e-5, atol=0)
    for r, b in enumerate(bins):
        start = 0
        for i in b:
            n = len(examples[i]["input_ids"])
            torch.testing.assert_close(packed_logits[r, start:start + n], unpacked_logits[i, :n],
                                       rtol=0, atol=1e-4)
            assert packed["token_source"][r, start:start + n].eq(examples[i]["source"]).all()
            start += n
        assert packed["token_source"][r, start:].eq(-1).all() and packed["targets"][r, start:].eq(-100).all()

    # Negative controls, to show the comparison above can fail: the same packed rows (a) numbered straight
    # through, so one causal block per row, and (b) with restarted positions but a plain causal mask (an
    # all-ones 2-D mask turns the packed-sequence detection off). Both let examples see earlier ones.
    rows_b, width = packed["input_ids"].shape
    with torch.no_grad():
        straight = model(input_ids=packed["input_ids"],
                         position_ids=torch.arange(width).expand(rows_b, width)).logits
        causal = model(input_ids=packed["input_ids"], attention_mask=torch.ones_like(packed["input_ids"]),
                       position_ids=packed["position_ids"]).logits
    for leaky in (straight, causal):
        leaky_loss, _ = token_loss_sum(leaky, packed["targets"])
        assert abs(float(leaky_loss - ref_loss)) > 1e-3 * float(ref_loss)


class EngineLike:
    """What the training forward sees of a DeepSpeed engine: callable, with the model as ``.module``."""

    def __init__(self, module):
        self.module = module

    def __call__(self, **kwargs):
        return self.module(**kwargs)


def test_training_forward_isolates_packed_samples_whatever_the_model_config(demo_tokenizer):
    """The training forward passes use_cache=False itself: a model whose config says use_cache=True (a
    checkpoint's config.json, a custom builder) would otherwise attend across the packed samples."""
    from sftdist.engine.forward import forward_logits

    examples = real_examples(demo_tokenizer, 8)
    bins, rows = packed_rows(examples)
    model = tiny_llama(demo_tokenizer, "sdpa", use_cache=True)
    engine = EngineLike(model)
    packed = collate_packed(rows, demo_tokenizer.pad_token_id)
    unpacked = collate(examples, demo_tokenizer.pad_token_id)
    with torch.no_grad():
        packed_logits = forward_logits(engine, packed)
        unpacked_logits = forward_logits(engine, unpacked)
        # Negative control: the same packed forward with the model's own cache setting crosses samples.
        leaky = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"]).logits
    start = 0
    for i in bins[0]:
        n = len(examples[i]["input_ids"])
        torch.testing.assert_close(packed_logits[0, start:start + n], unpacked_logits[i, :n], rtol=0, atol=1e-4)
        start += n
    assert (leaky - packed_logits).abs().max() > 1e-2


def test_flattened_packed_batch_equals_unpacked(demo_tokenizer):
    """The one-row layout that flash_attention_2 needs gives the same loss under sdpa."""
    examples = real_examples(demo_tokenizer, 8)
    _, rows = packed_rows(examples)
    model = tiny_llama(demo_tokenizer, "sdpa")
    packed = collate_packed(rows, demo_tokenizer.pad_token_id)
    unpacked = collate(examples, demo_tokenizer.pad_token_id)
    with torch.no_grad():
        flat = model(input_ids=packed["input_ids"].view(1, -1),
                     position_ids=packed["position_ids"].view(1, -1))
        ref = model(input_ids=unpacked["input_ids"], attention_mask=unpacked["attention_mask"])
    torch.testing.assert_close(token_loss_sum(flat.logits, packed["targets"].view(1, -1))[0],
                               token_loss_sum(ref.logits, unpacked["targets"])[0], rtol=1e-5, atol=0)
