"""Model FLOPs for MFU (sftdist/observe/flops.py): parameter counts by role on real tiny models (full, tied, LoRA,
mixture of experts, ZeRO-3 partitioned), the attention term from collated batches, and the peak table."""

import doctest
import random
from types import SimpleNamespace

import torch

import sftdist.observe.flops
from sftdist.data.collate import collate, collate_packed
from sftdist.observe.flops import (
    PEAK_BF16_FLOPS,
    FlopsModel,
    attention_work,
    flops_model,
    measured_matmul_peak,
    peak_flops_per_device,
)

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER, VOCAB, LAYERS = 8, 2, 1, 4, 16, 32, 2
KV = KV_HEADS * HEAD_DIM  # 4: width of k_proj and v_proj
# One Llama layer, by hand:
ATTN = HIDDEN * HIDDEN + HIDDEN * KV + HIDDEN * KV + HIDDEN * HIDDEN  # q, k, v, o: 64 + 32 + 32 + 64 = 192
MLP = 3 * HIDDEN * INTER  # gate, up, down: 3 * 128 = 384
NORMS = 2 * HIDDEN  # input and post-attention RMSNorm: 16
BODY = LAYERS * (ATTN + MLP + NORMS) + HIDDEN  # 2 * 592 + final norm 8 = 1192
HEAD = VOCAB * HIDDEN  # 256


def tiny(model_type="llama", **extra):
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
                  num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, tie_word_embeddings=False)
    config = AutoConfig.for_model(model_type, **{**fields, **extra})
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


def test_docstring_examples():
    assert doctest.testmod(sftdist.observe.flops).failed == 0


def test_full_finetune_counts_and_step_flops_by_hand():
    assert BODY == 1192
    model = flops_model(tiny())
    assert model == FlopsModel(trainable_params=1192, frozen_params=0, head_params=256, head_trainable=True,
                               layers=2, attention_dim=8)  # attention_dim = 2 heads * head_dim 4
    # 10 tokens in documents of 6 and 4 (36 + 16 = 52), head on the 7 supervised tokens:
    # body 6 * 1192 * 10 = 71520; attention 12 * 2 * 8 * 52 = 9984; head 6 * 256 * 7 = 10752.
    assert model.step_flops(tokens=10, attention_work=52, head_tokens=7) == 71520 + 9984 + 10752 == 92256


def test_attention_dim_follows_config_head_dim():
    # head_dim 6 != hidden / heads = 4: q_proj is 8 -> 12 and the scores are 12 wide.
    assert flops_model(tiny(head_dim=6)).attention_dim == 2 * 6


def test_tied_head_is_counted_once_as_head():
    model = tiny(tie_word_embeddings=True)
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight
    counts = flops_model(model)
    assert (counts.trainable_params, counts.frozen_params) == (BODY, 0)
    assert (counts.head_params, counts.head_trainable) == (VOCAB * HIDDEN, True)


def test_lora_base_is_frozen_adapters_trainable_head_frozen():
    from peft import LoraConfig, get_peft_model

    r = 2
    model = get_peft_model(tiny(), LoraConfig(r=r, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    # Per layer: q_proj A (r x 8) + B (8 x r) = 2 * (8 + 8) = 32;
    #            v_proj A (r x 8) + B (4 x r) = 2 * (8 + 4) = 24.
    adapters = LAYERS * (r * (HIDDEN + HIDDEN) + r * (HIDDEN + KV))
    assert adapters == 112
    counts = flops_model(model)
    assert (counts.trainable_params, counts.frozen_params) == (112, 1192)
    assert (counts.head_params, counts.head_trainable) == (256, False)
    # One token, no attention: 6 per adapter parameter, 4 per frozen body and head parameter.
    assert counts.step_flops(tokens=1, attention_work=0, head_tokens=1) == 6 * 112 + 4 * 1192 + 4 * 256


def test_mixtral_experts_count_at_experts_per_token_over_experts():
    counts = flops_model(tiny("mixtral", num_hidden_layers=1, num_local_experts=4, num_experts_per_tok=2))
    router = HIDDEN * 4  # 32
    experts = 4 * (2 * INTER * HIDDEN + HIDDEN * INTER)  # 4 experts x (gate+up 256 + down 128) = 1536
    assert counts.trainable_params == ATTN + router + experts * 2 // 4 + NORMS + HIDDEN == 1016
    assert counts.head_params == HEAD


def test_qwen2_moe_num_experts_and_shared_expert_in_full():
    counts = flops_model(tiny("qwen2_moe", num_hidden_layers=1, num_experts=4, num_experts_per_tok=2,
                              moe_intermediate_size=4, shared_expert_intermediate_size=8))
    attn = ATTN + HIDDEN + KV + KV  # q, k, v biases: 192 + 16 = 208
    router, shared_gate = HIDDEN * 4, HIDDEN  # 32, 8
    experts = 4 * 3 * HIDDEN * 4  # 4 experts x (gate, up, down) x 8 x 4 = 384, 2 of 4 run
    shared = 3 * HIDDEN * 8  # the shared expert runs for every token: 192
    norms = NORMS + HIDDEN  # 24
    assert counts.trainable_params == attn + router + experts // 2 + shared + shared_gate + norms == 656


def test_position_embeddings_are_a_lookup_not_body():
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("gpt2", vocab_size=32, n_embd=8, n_layer=1, n_head=2, n_positions=16,
                                  bos_token_id=0, eos_token_id=0)
    counts = flops_model(AutoModelForCausalLM.from_config(config))
    # Layer: ln_1 8+8, c_attn 8x24+24, c_proj 8x8+8, ln_2 8+8, c_fc 8x32+32, c_proj 32x8+8 = 872; ln_f 16.
    # wpe (16 x 8) is left out; wte is tied to the head.
    assert counts.trainable_params == 16 + 216 + 72 + 16 + 288 + 264 + 16 == 888
    assert (counts.head_params, counts.attention_dim) == (32 * 8, 2 * 4)


def partitioned(full_numel, requires_grad=True):
    """A parameter as ZeRO-3 leaves it on a rank: no local elements, the full size in ds_numel."""
    param = torch.nn.Parameter(torch.empty(0), requires_grad=requires_grad)
    param.ds_numel = full_numel
    return param


class PartitionedModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace(num_hidden_layers=1, num_attention_heads=1, hidden_size=3)
        # The input embedding is no nn.Embedding here: only get_input_embeddings() tells it apart.
        self.embed, self.layer, self.head = torch.nn.Module(), torch.nn.Linear(3, 3), torch.nn.Linear(3, 4)
        self.embed.weight, self.head.weight = partitioned(12), partitioned(12)
        self.layer.weight, self.layer.bias = partitioned(9), partitioned(3, requires_grad=False)
        self.head.bias = None

    def get_input_embeddings(self):
        return self.embed

    def get_output_embeddings(self):
        return self.head


def test_zero3_partitioned_parameters_count_full_size():
    assert all(p.numel() == 0 for p in PartitionedModel().parameters())
    assert flops_model(PartitionedModel()) == FlopsModel(trainable_params=9, frozen_params=3, head_params=12,
                                                         head_trainable=True, layers=1, attention_dim=3)


def test_attention_work_hand_built_batches():
    assert attention_work(torch.tensor([[0, 1, 2, 0, 1, 0]]), torch.tensor([[0, 0, 0, 1, 1, -1]])) == 9 + 4
    # Two rows; a 1-token document right before padding whose position restarts at 0.
    assert attention_work(torch.tensor([[0, 1, 2, 3], [0, 1, 0, 0]]),
                          torch.tensor([[0, 0, 0, 0], [0, 0, 1, -1]])) == 16 + 4 + 1
    # Padding whose positions happen to continue the document is still not part of it.
    assert attention_work(torch.tensor([[0, 1, 2]]), torch.tensor([[0, 0, -1]])) == 4
    # Documents split where the position does not go up by one, as transformers and sdpa_by_document split.
    assert attention_work(torch.tensor([[5, 6, 7, 2, 3]]), torch.zeros(1, 5, dtype=torch.long)) == 9 + 4
    assert attention_work(torch.zeros(0, 0, dtype=torch.long), torch.zeros(0, 0, dtype=torch.long)) == 0


def examples(lengths):
    return [{"input_ids": [7] * n, "labels": [7] * n, "source": i % 3} for i, n in enumerate(lengths)]


def test_attention_work_of_collated_batches():
    padded = collate(examples([3, 2]), pad_id=0)  # the docstring batch: [[0,1,2],[0,1,0]]
    assert attention_work(padded["position_ids"], padded["token_source"]) == 9 + 4
    packed = collate_packed([examples([3, 2]), examples([2])], pad_id=0)  # row 2 pads 0, 1, 2
    assert attention_work(packed["position_ids"], packed["token_source"]) == 9 + 4 + 4

    rng = random.Random(0)
    rows = [[rng.randint(1, 9) for _ in range(rng.randint(1, 4))] for _ in range(6)]
    packed = collate_packed([examples(row) for row in rows], pad_id=0)
    expected = sum(n * n for row in rows for n in row)
    assert attention_work(packed["position_ids"], packed["token_source"]) == expected


def test_peak_table_picks_the_specific_device():
    def bf16(name):
        return peak_flops_per_device(name, "bf16")

    assert bf16("NVIDIA H100 80GB HBM3") == 989e12
    assert bf16("NVIDIA H100 PCIe") == 756e12
    assert bf16("nvidia h100 pcie") == 756e12
    assert bf16("NVIDIA GH200 480GB") == 989e12
    assert bf16("NVIDIA A100-SXM4-80GB") == bf16("NVIDIA A100 80GB PCIe") == 312e12
    assert bf16("NVIDIA A10G") == 70e12
    assert bf16("NVIDIA A10") == 125e12
    assert bf16("NVIDIA RTX A1000") is None  # not an A10
    assert bf16("NVIDIA L40S") == 362e12
    assert bf16("NVIDIA L40") == 181e12
    assert bf16("NVIDIA L4") == 121e12
    assert bf16("NVIDIA GeForce RTX 4090") == 165.2e12
    assert bf16("AMD Instinct MI300X") == 1307.4e12
    assert bf16("NVIDIA GeForce GTX 1080") is None
    # Every key, seen as a device name, finds its own entry: no key shadows another.
    assert all(bf16(f"NVIDIA {key}") == value for key, value in PEAK_BF16_FLOPS.items())


def test_peak_by_precision():
    assert peak_flops_per_device("NVIDIA H100 80GB HBM3", "fp16") == 989e12
    assert peak_flops_per_device("NVIDIA H100 80GB HBM3", "fp32") is None
    assert peak_flops_per_device("Tesla V100-SXM2-32GB", "fp16") == 125e12
    assert peak_flops_per_device("Tesla V100-SXM2-32GB", "bf16") is None  # no bf16 tensor cores


def test_measured_matmul_peak_is_plausible_for_a_cpu():
    """Between what any CPU core does through torch's BLAS at this size (1 GFLOP/s) and the hardware bound
    of the threads torch uses: 5 GHz x 64 fp32 FLOPs per cycle (two AVX-512 FMA units) per thread. (It
    accepted six decades before; this is under three on a 2-core machine.)"""
    import torch

    peak = measured_matmul_peak(size=256, repeats=3)
    assert 1e9 < peak < torch.get_num_threads() * 5e9 * 64


def test_measured_matmul_peak_is_flops_over_the_best_time(monkeypatch):
    ticks = iter([0.0, 0.5, 1.0, 1.25, 2.0, 3.0])  # three timed runs of 0.5, 0.25 and 1.0 seconds
    monkeypatch.setattr(sftdist.observe.flops.time, "perf_counter", lambda: next(ticks))
    assert measured_matmul_peak(size=64, repeats=3) == 2 * 64**3 / 0.25
