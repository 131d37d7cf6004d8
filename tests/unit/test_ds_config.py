"""build_ds_config against expected dicts, one per parallelism preset; bf16 runs accumulate gradients in
fp32 wherever DeepSpeed can, checked on real engines."""

import json
import sys
import textwrap

import pytest
from omegaconf import OmegaConf

from sftdist.config import ParallelConfig, TrainConfig
from sftdist.engine.deepspeed_wrap import build_ds_config
from tests.conftest import compose, run_cmd

TRAIN = TrainConfig(micro_batch_size=2, global_batch_size=16, lr=1e-4, grad_clip=1.0, weight_decay=0.01,
                    adam_betas=[0.9, 0.95], adam_eps=1e-8)
COMMON = {
    "train_batch_size": 16, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 4,
    "gradient_clipping": 1.0,
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.01}},
    "bf16": {"enabled": True},
    "fp16": {"enabled": False, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
             "hysteresis": 2, "min_loss_scale": 1},
    "zero_allow_untested_optimizer": True, "steps_per_print": 2**31 - 1, "wall_clock_breakdown": False,
}
STAGE12 = {"overlap_comm": True, "contiguous_gradients": True, "reduce_bucket_size": 200_000_000,
           "allgather_bucket_size": 200_000_000, "reduce_scatter": True}
STAGE3 = {"stage": 3, "overlap_comm": True, "contiguous_gradients": True, "reduce_bucket_size": 200_000_000,
          "stage3_prefetch_bucket_size": 50_000_000, "stage3_param_persistence_threshold": 100_000,
          "stage3_max_live_parameters": 1_000_000_000, "stage3_gather_16bit_weights_on_model_save": True}
EXPECTED_ZERO = {
    "zero0": {"stage": 0},
    "zero1": {"stage": 1, **STAGE12},
    "zero2": {"stage": 2, **STAGE12},
    "zero3": STAGE3,
    "zero3_offload": {**STAGE3, "offload_optimizer": {"device": "cpu", "pin_memory": True},
                      "offload_param": {"device": "cpu", "pin_memory": True}},
}


@pytest.mark.parametrize("preset", sorted(EXPECTED_ZERO))
def test_preset_gives_expected_ds_config(preset):
    parallel = OmegaConf.to_object(compose([f"parallelism={preset}"]).parallelism)
    got = build_ds_config(parallel, TRAIN, dp_world=2, precision="bf16", gpu=True)
    # bf16 sums micro-batch gradients in fp32, except under ZeRO-0 whose engine cannot
    data_types = {} if preset == "zero0" else {"data_types": {"grad_accum_dtype": "fp32"}}
    assert got == {**COMMON, "zero_optimization": EXPECTED_ZERO[preset], **data_types}
    assert '"auto"' not in json.dumps(got)


def test_cpu_fp32_nvme_and_no_clipping():
    parallel = ParallelConfig(zero_stage=3, offload_optimizer=True, nvme_path="/local/nvme")
    got = build_ds_config(parallel, TrainConfig(micro_batch_size=1, global_batch_size=2, grad_clip=0.0, lr=1e-4),
                          dp_world=1, precision="fp32", gpu=False)
    assert got["bf16"] == {"enabled": False} and got["fp16"]["enabled"] is False
    assert got["gradient_accumulation_steps"] == 2 and got["gradient_clipping"] == 0.0
    assert got["zero_optimization"]["offload_optimizer"] == {"device": "nvme", "pin_memory": False,
                                                             "nvme_path": "/local/nvme"}
    assert "offload_param" not in got["zero_optimization"]


def test_grad_accum_dtype_choices():
    def accum(precision, **kw):
        return build_ds_config(ParallelConfig(**kw), TRAIN, dp_world=2, precision=precision,
                               gpu=True).get("data_types")

    assert accum("bf16", zero_stage=1, grad_accum_dtype="bf16") == {"grad_accum_dtype": "bf16"}
    assert accum("fp32", zero_stage=2) is None and accum("fp16", zero_stage=2) is None
    assert accum("bf16", zero_stage=0, grad_accum_dtype="bf16") == {"grad_accum_dtype": "bf16"}
    with pytest.raises(ValueError, match="grad_accum_dtype=fp32 needs parallelism.zero_stage >= 1"):
        ParallelConfig(zero_stage=0, grad_accum_dtype="fp32")


ENGINES = textwrap.dedent('''
    """Real bf16 DeepSpeed engines on the CPU accelerator: which dtype does each stage accumulate in?"""
    import json

    import torch

    from sftdist.config import ParallelConfig, TrainConfig
    from sftdist.engine.deepspeed_wrap import build_ds_config, wrap_with_deepspeed
    from sftdist.engine.distributed import init_distributed

    init_distributed()
    out = {}
    for stage in (1, 2, 3):
        model = torch.nn.Sequential(torch.nn.Linear(8, 8)).to(torch.bfloat16)
        ds_config = build_ds_config(ParallelConfig(zero_stage=stage), TrainConfig(micro_batch_size=1, global_batch_size=4, lr=1e-4),
                                    dp_world=1, precision="bf16", gpu=False)
        engine = wrap_with_deepspeed(model, [{"params": list(model.parameters())}], ds_config, lambda s: 1.0)
        out[stage] = [type(engine.optimizer).__name__, str(engine.get_data_types()[1]),
                      str(getattr(engine.optimizer, "gradient_accumulation_dtype", None))]
    print("ENGINES " + json.dumps(out))
''')


def test_bf16_engines_accumulate_in_fp32(tmp_path):
    """ZeRO-1 switches to DeepSpeed's BF16_Optimizer (fp32 gradient buffers); ZeRO-2/3 keep fp32 accumulators."""
    script = tmp_path / "engines.py"
    script.write_text(ENGINES)
    proc = run_cmd([sys.executable, str(script)])
    got = json.loads(proc.stdout.split("ENGINES ", 1)[1].splitlines()[0])
    assert got["1"][:2] == ["BF16_Optimizer", "torch.float32"]
    assert got["2"] == ["DeepSpeedZeroOptimizer", "torch.float32", "torch.float32"]
    assert got["3"] == ["DeepSpeedZeroOptimizer_Stage3", "torch.float32", "torch.float32"]
