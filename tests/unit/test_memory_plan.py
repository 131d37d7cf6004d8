"""sftdist-plan: hand-computed model states, DeepSpeed's estimator, peft's LoRA count, the micro-batch search,
the measured CPU runs of bench/zero_memory.py, and the CLI end to end on the tiny preset."""

from __future__ import annotations

import contextlib
import io
import json
import sys
from types import SimpleNamespace

import pytest

from sftdist.config import PeftConfig
from sftdist.engine.memory_plan import (
    NF4_BYTES,
    ModelShape,
    Setup,
    deepspeed_model_states,
    largest_fitting,
    model_states,
)
from tests.conftest import run_cmd

SHAPE = ModelShape(params=1000, trainable=1000, quantized=800, largest_module=100, layers=2, hidden=8,
                   heads=2, vocab=10)
MIB = 2**20


def _device(states):
    return {k: dev for k, (dev, _) in states.items()}


@pytest.mark.parametrize("precision, stage, expected", [
    # 1,000 parameters on 4 ranks: bytes of (params, grads, optimizer) per rank, worked out by hand
    ("bf16", 0, (2000, 2000 + 4000, 12000)),          # 16-bit grads + fp32 copy; master + 2 moments
    ("bf16", 1, (2000, 2000 + 4000, 12000 / 4)),      # BF16_Optimizer: unpartitioned fp32 grads
    ("fp16", 1, (2000, 2000 + 4000 / 4, 12000 / 4)),
    ("bf16", 2, (2000, 6000 / 4, 12000 / 4)),
    ("bf16", 3, (2000 / 4 + 4 * 100, 6000 / 4, 12000 / 4)),  # + DeepSpeed's gathered largest module
    ("fp32", 0, (4000, 4000, 8000)),                  # no master copy
    ("fp32", 1, (4000, 4000, 12000 / 4)),
    ("fp32", 2, (4000, 4000 / 4, 12000 / 4)),
    ("fp32", 3, (4000 / 4 + 4 * 100, 8000 / 4, 12000 / 4)),  # gradient partition held twice
])
def test_full_fine_tuning_by_hand(precision, stage, expected):
    got = _device(model_states(SHAPE, Setup(zero_stage=stage, world=4, precision=precision)))
    assert (got["params"], got["grads"], got["optimizer"]) == pytest.approx(expected)


def test_lora_qlora_and_offload_by_hand():
    lora = ModelShape(**{**vars(SHAPE), "params": 1000, "trainable": 100})
    got = _device(model_states(lora, Setup(zero_stage=2, world=4, precision="bf16", peft="lora")))
    assert got == pytest.approx({"params": 2000, "grads": 100 * 6 / 4, "optimizer": 100 * 12 / 4})
    got = _device(model_states(lora, Setup(zero_stage=0, world=1, precision="bf16", peft="qlora")))
    assert got["params"] == pytest.approx(100 * 2 + 800 * NF4_BYTES + 100 * 2)  # 4-bit linear weights
    both = model_states(SHAPE, Setup(zero_stage=3, world=4, precision="bf16", offload_optimizer=True,
                                     offload_params=True))
    assert both == {"params": (400.0, 500.0), "grads": (0.0, 1000.0), "optimizer": (0.0, 3000.0)}


@pytest.mark.parametrize("world", [1, 2, 8, 64])
@pytest.mark.parametrize("stage, offload", [(2, False), (2, True), (3, False), (3, True)])
def test_device_model_states_match_deepspeed(world, stage, offload):
    """Mixed-precision full fine-tuning: our device figure equals DeepSpeed's estimator (to its int()
    rounding) for ZeRO-2 and for offload, and exceeds it under ZeRO-3 by exactly the 16-bit parameter
    partition (2/N bytes per parameter) that its 18/N leaves out."""
    shape = ModelShape(params=7_615_616_512, trainable=7_615_616_512, quantized=0, largest_module=544_997_376,
                       layers=28, hidden=3584, heads=28, vocab=152064)
    setup = Setup(zero_stage=stage, world=world, precision="bf16", offload_optimizer=offload,
                  offload_params=offload and stage == 3)
    ours = sum(_device(model_states(shape, setup)).values())
    ds_device, _ = deepspeed_model_states(shape, setup)
    missing = 2 * shape.params / world if stage == 3 and not offload else 0
    assert ours - missing == pytest.approx(ds_device, abs=2)


# bench/RESULTS.md "ZeRO per-rank memory": 2 ranks, fp32, params+grads+optimizer MiB of the larger rank
MEASURED = {("tiny", 0): 13.3, ("tiny", 2): 10.7, ("tiny", 3): 9.7,
            ("h512", 0): 368.1, ("h512", 2): 279.9, ("h512", 3): 275.1}
PARAMS = {"tiny": 869_504, "h512": 24_125_952}


@pytest.mark.parametrize("model, stage", list(MEASURED))
def test_matches_measured_cpu_runs(model, stage):
    """Within 1% for ZeRO-0 and 8% otherwise (the ZeRO-2 tiny run holds an extra flattened group copy)."""
    n = PARAMS[model]
    shape = ModelShape(params=n, trainable=n, quantized=0, largest_module=0, layers=1, hidden=1, heads=1,
                       vocab=1)
    states = model_states(shape, Setup(zero_stage=stage, world=2, precision="fp32"))
    ours = sum(_device(states).values()) / MIB
    assert ours == pytest.approx(MEASURED[model, stage], rel=0.01 if stage == 0 else 0.08)


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_lora_count_equals_peft_on_a_real_model(method, demo_tokenizer):
    from sftdist.config import ModelConfig, PeftConfig
    from sftdist.engine.adapter import apply_peft
    from sftdist.engine.memory_plan import hf_config, model_shape
    from sftdist.engine.model import build_model

    peft = PeftConfig(method=method, r=4, target_modules=["all-linear"])
    model_cfg = ModelConfig(tokenizer="builtin:demo", from_config={
        "model_type": "llama", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": False})
    shape = model_shape(hf_config(model_cfg), peft)
    real = apply_peft(build_model(model_cfg, demo_tokenizer, precision="fp32", activation_checkpointing=False,
                                  seed=0), PeftConfig(**{**vars(peft), "method": "lora"}))
    trainable, total = real.get_nb_trainable_parameters()
    assert (shape.trainable, shape.params) == (trainable, total)


def test_largest_micro_batch_search():
    assert largest_fitting(lambda m: m <= 1) == 1
    assert largest_fitting(lambda m: m <= 37) == 37
    assert largest_fitting(lambda m: True, limit=100) == 100
    assert largest_fitting(lambda m: False) == 0


def test_metrics_median(tmp_path):
    from sftdist.tools.plan import measured_tokens_per_sec

    rows = [{"step": 0, "eval_loss": 5.0}, {"step": 1, "tokens_per_sec": 100.0},
            {"step": 2, "tokens_per_sec": 300.0}, {"step": 3, "tokens": 1000, "step_time_s": 5.0}]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert measured_tokens_per_sec(path) == 200.0


def _plan(*args):
    """Run sftdist-plan in this process (the imports are paid once), like ``run_cmd``'s result."""
    from sftdist.tools.plan import main

    out, code, err = io.StringIO(), 0, ""
    try:
        with contextlib.redirect_stdout(out):
            main(list(args))
    except SystemExit as e:  # sys.exit("sftdist-plan: error: ...") is how main reports an error
        code, err = 1, str(e.code)
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err)


def _plan_process(*args, env=None):
    return run_cmd([sys.executable, "-c", "from sftdist.tools.plan import main; main()", *args], check=False,
                   env=env)


def test_cli_no_data_table_and_json(tmp_path):
    out = tmp_path / "plan.json"
    proc = _plan_process("--no-data", "--gpu-mem", "2", "--world-size", "2", "--json", str(out),
                         "parallelism=zero3")
    assert proc.returncode == 0, proc.stderr
    for line in ("parameters", "gradients", "optimizer states", "model states", "activations, checkpointed",
                 "logits + loss", "comm. buckets", "total", "fits 2 GiB per device"):
        assert line in proc.stdout
    plan = json.loads(out.read_text())
    assert plan["setup"]["world"] == 2 and plan["model"]["params"] == 869_504
    assert plan["largest_micro_batch"] >= plan["micro_batch"] and plan["fits"]
    usable = plan["largest_usable_micro_batch"]  # default global batch 32 over 2 ranks: a divisor of 16
    assert 0 < usable <= plan["largest_micro_batch"] and 16 % usable == 0


def test_cli_with_data_and_eta(tmp_path):
    out = tmp_path / "plan.json"
    proc = _plan("--tokens-per-sec", "1000", "--json", str(out), "data.sources.0.max_samples=64",
                 "data.sources.1.max_samples=16", "train.global_batch_size=8", "train.micro_batch_size=2",
                 "train.max_steps=-1", "train.epochs=2")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())["data"]
    assert data["sequences_per_epoch"] > 0 and data["run_steps"] == int(2 * data["steps_per_epoch"])
    assert "ETA at 1,000 tokens/s" in proc.stdout and "optimizer steps per epoch" in proc.stdout
    assert json.loads(out.read_text())["eta_s"] == pytest.approx(data["run_tokens"] / 1000)


@pytest.mark.parametrize("args, message", [
    (["--no-data", "train.lrr=1"], "unknown config key 'train.lrr' (did you mean train.lr?)"),
    (["--no-data", "model.name_or_path=/no/such/model"], "model.name_or_path=/no/such/model: no such file"),
])
def test_cli_errors_are_one_line(args, message):
    proc = _plan(*args)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("sftdist-plan: error:")]
    assert len(errors) == 1 and message in errors[0], proc.stderr



def test_docstring_examples():
    import doctest

    import sftdist.engine.activation_memory
    import sftdist.engine.memory_plan

    assert doctest.testmod(sftdist.engine.memory_plan).failed == 0
    assert doctest.testmod(sftdist.engine.activation_memory).failed == 0


def _saved_bytes(model, ids, pos) -> int:
    """Bytes of the tensors autograd saves in one forward (each storage once, parameters excluded)."""
    import torch

    from sftdist.engine import attention

    seen: dict[int, int] = {}

    def pack(t):
        base = t._base if t._base is not None else t
        if not isinstance(base, torch.nn.Parameter):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, position_ids=pos, use_cache=False,
              documents=attention.Documents.from_positions(pos))
    return sum(seen.values())


@pytest.mark.parametrize("method", ["none", "lora"])
@pytest.mark.parametrize("tiled", [False, True], ids=["", "tiled_mlp"])
def test_one_layers_activations_are_what_autograd_saves(method, tiled):
    """The per-layer count of activation_memory against the bytes a Llama layer saves under sftdist's attention
    (packed rows, sdpa by document) on CPU: the difference between a 3- and a 2-layer model is one layer, so the
    embedding's and the first layer's special cases (no gradient into a frozen embedding) drop out. With the
    MLP tiled (parallelism.tiled_mlp; 256 positions over hidden 64: 4 tiles) autograd keeps the MLP's input
    only, and none of its adapters' tensors."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from sftdist.engine import attention, tiling
    from sftdist.engine.activation_memory import layer_bytes_per_token
    from sftdist.engine.adapter import apply_peft

    peft = PeftConfig(method=method, r=4, alpha=8, dropout=0.1, target_modules=["all-linear"])
    b, s, saved = 2, 256 if tiled else 64, {}
    ids = torch.randint(0, 128, (b, s))
    pos = torch.cat([torch.arange(s * 5 // 8), torch.arange(s * 3 // 8)]).repeat(b, 1)
    for layers in (2, 3):
        config = LlamaConfig(hidden_size=64, intermediate_size=176, num_hidden_layers=layers,
                             num_attention_heads=4, num_key_value_heads=2, vocab_size=128, use_cache=False)
        model = apply_peft(attention.use_for(LlamaForCausalLM(config), "sdpa", s), peft)
        if tiled:
            assert tiling.tile_mlps(model) == layers
        saved[layers] = _saved_bytes(model.train().get_base_model().model if method != "none"
                                     else model.train().model, ids, pos)
    # q, k, v, o, gate, up take 64 features, down 176; seven rank-4 outputs (three of them the MLP's)
    lora = {"adapter_inputs": 6 * 64 + 176, "adapter_ranks": 7 * 4, "adapter_dropout": 0.1,
            "mlp_adapter_inputs": 2 * 64 + 176, "mlp_adapter_ranks": 3 * 4} if method != "none" else {}
    shape = ModelShape(params=0, trainable=0, quantized=0, largest_module=0, layers=1, hidden=64, heads=4,
                       vocab=128, intermediate=176, **lora)
    planned = b * s * layer_bytes_per_token(shape, seq=s, precision="fp32", fused_attention=True,
                                            frozen_base=method != "none", device="cpu", tiled_mlp=tiled)
    assert planned == pytest.approx(saved[3] - saved[2], rel=0.03)


def test_cpu_buckets_hold_only_the_written_gradients():
    from sftdist.engine.memory_plan import bucket_bytes

    kw = {"zero_stage": 2, "precision": "fp32", "reduce_bucket": 200_000_000, "overlap_comm": True,
          "contiguous_gradients": True}
    # a GPU reserves both buckets whole; a CPU holds the pages gradients were written to
    assert bucket_bytes(**kw) == bucket_bytes(**kw, trainable=5_000_000) == 2 * 200_000_000 * 4
    assert bucket_bytes(**kw, trainable=5_000_000, device="cpu") == 5_000_000 * 4
    assert bucket_bytes(**kw, trainable=10**9, device="cpu") == 2 * 200_000_000 * 4


def test_bad_metrics_file_is_one_line_before_any_work(tmp_path):
    bad = tmp_path / "metrics.jsonl"
    bad.write_text('{"step": 1, "tokens_per_sec": 5}\nnot json\n')
    proc = _plan("--metrics", str(bad))
    assert proc.returncode != 0
    expected = f"sftdist-plan: error: --metrics {bad}: line 2 is not JSON (Expecting value: line 1 column 1"
    assert proc.stderr.strip().splitlines()[-1].startswith(expected)


QWEN_0_5B = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 896,
             "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
             "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True,
             "max_position_embeddings": 32768}


def test_cli_reads_a_local_model_directory(tmp_path):
    model_dir = tmp_path / "qwen"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(QWEN_0_5B))
    out = tmp_path / "plan.json"
    proc = _plan("--no-data", "--json", str(out), f"model.name_or_path={model_dir}")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(out.read_text())["model"]["params"] == 494_032_768  # Qwen2.5-0.5B's published count


def test_cli_reads_a_presets_config_from_the_hub_cache(tmp_path):
    """model=qwen2_5_0_5b names a hub id; its config.json is read from the local cache, never downloaded."""
    repo = tmp_path / "hub" / "models--Qwen--Qwen2.5-0.5B-Instruct"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps(QWEN_0_5B))
    out = tmp_path / "plan.json"
    proc = _plan_process("--no-data", "--json", str(out), "model=qwen2_5_0_5b", "peft=lora",
                         env={"HF_HUB_CACHE": str(tmp_path / "hub")})
    assert proc.returncode == 0, proc.stderr
    model = json.loads(out.read_text())["model"]
    assert model["params"] > model["trainable"] > 0 and model["vocab"] == 151936
    proc = _plan_process("--no-data", "model=qwen2_5_0_5b", env={"HF_HUB_CACHE": str(tmp_path / "empty")})
    assert "its config.json is not in the local Hugging Face cache" in proc.stderr.splitlines()[-1]


def test_zero3_logits_are_one_chunk_as_in_training():
    """Under ZeRO-3 training computes a micro-batch's supervised logits in one chunk (the head's weight is
    partitioned: engine/forward.py); the planner assumed loss_chunk_tokens chunks there and overstated the
    largest micro-batch that fits, 43 against 16 for a 7B model (#10)."""
    from sftdist.config import compose_config
    from sftdist.engine.memory_plan import Setup
    from sftdist.tools.plan import memory_rows

    shape = ModelShape(params=10**9, trainable=10**9, quantized=0, largest_module=10**7, layers=8, hidden=1024,
                       heads=8, vocab=152_000)
    cfg = compose_config(["train.max_length=4096", "train.loss_chunk_tokens=1024"])
    logits = {stage: memory_rows(shape, Setup(zero_stage=stage, world=8, precision="bf16"), cfg,
                                 micro_batch=4)["logits + loss"][0] for stage in (2, 3)}
    tokens = 4 * 4096
    assert logits[2] == 1024 * 152_000 * 4 + tokens * 1024 * 2  # one chunk of 1024 rows of fp32 logits
    assert logits[3] == tokens * 152_000 * 4 + tokens * 1024 * 2  # every row at once
