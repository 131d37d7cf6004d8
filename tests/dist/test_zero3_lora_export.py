"""Under ZeRO-3, exporting a LoRA run gathers only the adapter: the whole-model consolidation DeepSpeed
offers (``_zero3_consolidated_16bit_state_dict``) would assemble the full base model on rank 0 to write a few
MB. The worker forbids it and checks that ``final/`` holds exactly the gathered adapter weights."""

import sys
import textwrap

from tests.conftest import FAST, run_cmd

WORKER = textwrap.dedent('''
    import os
    import sys
    from pathlib import Path

    import deepspeed
    import torch
    from safetensors.torch import load_file

    from sftdist.lifecycle.checkpoint import save_final
    from sftdist.config import compose_config
    from sftdist.engine.model import load_tokenizer
    from sftdist.engine.deepspeed_wrap import build_ds_config
    from sftdist.engine.distributed import init_distributed, is_main, world_size
    from sftdist.train import build_engine

    out = Path(sys.argv[1])
    init_distributed()
    cfg = compose_config([*sys.argv[2:], "parallelism=zero3", "peft=lora"])
    tokenizer = load_tokenizer(cfg.model)
    ds_config = build_ds_config(cfg.parallelism, cfg.train, dp_world=world_size(), precision="fp32", gpu=False)
    engine, model = build_engine(cfg, tokenizer, ds_config, precision="fp32", max_steps=3)

    def whole_model():
        raise AssertionError("save_final gathered the whole model for a LoRA export")

    engine._zero3_consolidated_16bit_state_dict = whole_model
    trainable = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
    with deepspeed.zero.GatheredParameters([p for _, p in trainable]):
        expected = {n.replace(".default", ""): p.detach().clone() for n, p in trainable}
    final = save_final(engine, tokenizer, out)
    if is_main():
        saved = load_file(final / "adapter_model.safetensors")
        assert set(saved) == set(expected), sorted(set(saved) ^ set(expected))[:4]
        assert all(torch.equal(saved[k], expected[k]) for k in saved)
        assert any(v.abs().sum() > 0 for v in saved.values())
        print("EXPORT OK", len(saved), flush=True)
    os._exit(0)  # skip interpreter teardown, as sftdist.train does in multi-process runs
''')


def test_zero3_lora_export_gathers_only_the_adapter(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    proc = run_cmd([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    str(script), str(tmp_path / "run"), *FAST])
    assert "EXPORT OK" in proc.stdout
