"""Under ZeRO-3 the model is created already partitioned: with the ``HfDeepSpeedConfig`` from
``zero3_init_context`` alive, transformers builds (from a config) or loads (``from_pretrained``) the model
inside ``deepspeed.zero.Init``, so each of 2 ranks holds about half of the parameter elements, and a loaded
model holds exactly the saved weights."""

import json
import sys
import textwrap

import pytest
from safetensors.torch import load_file

from tests.conftest import run_cmd

WORKER = textwrap.dedent('''
    """Build the tiny model as sftdist.train does under ZeRO-0 and ZeRO-3; report what each rank holds."""
    import json
    import os
    import sys
    from pathlib import Path

    import torch

    from sftdist.config import compose_config
    from sftdist.engine.model import build_model, load_tokenizer
    from sftdist.engine.deepspeed_wrap import build_ds_config, resolve_precision, zero3_init_context
    from sftdist.engine.distributed import has_gpu, init_distributed, rank, world_size

    out, pretrained = Path(sys.argv[1]), sys.argv[2]
    init_distributed()
    report = {"world_size": world_size()}
    for case, overrides in {
        "zero0": ["parallelism=zero0"],
        "zero3": ["parallelism=zero3"],
        "zero3_pretrained": ["parallelism=zero3", f"model.name_or_path={pretrained}",
                             "model.from_config=null"],
    }.items():
        cfg = compose_config(overrides)
        precision = resolve_precision(cfg.parallelism.precision, gpu=has_gpu())
        ds_config = build_ds_config(cfg.parallelism, cfg.train, dp_world=world_size(), precision=precision,
                                    gpu=has_gpu())
        zero3_ctx = zero3_init_context(ds_config)  # must outlive build_model, as in sftdist.train.run
        model = build_model(cfg.model, load_tokenizer(cfg.model), precision=precision,
                            activation_checkpointing=False, seed=cfg.train.seed)
        del zero3_ctx
        params = list(model.parameters())
        partitioned = [p for p in params if hasattr(p, "ds_tensor")]
        report[case] = {
            "params": len(params),
            "partitioned": len(partitioned),
            "local": sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in params),
            "full": sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in params),
            "tied": model.get_output_embeddings().weight is model.get_input_embeddings().weight,
        }
        if case == "zero3_pretrained":
            import deepspeed
            from safetensors.torch import save_file

            with deepspeed.zero.GatheredParameters(params):  # collective: every rank enters
                weights = {n: p.detach().clone() for n, p in model.named_parameters()}
            if rank() == 0:
                save_file(weights, str(out / "gathered.safetensors"))
        del model
    (out / f"rank{rank()}.json").write_text(json.dumps(report))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    # As sftdist.train does after a finished multi-process run: skip interpreter teardown, where a native
    # thread of the gloo/DeepSpeed stack occasionally aborts the process ("terminate called without an
    # active exception") after all the work is done.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
''')


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    """Per-rank reports of the worker on 2 ranks, the saved model directory and the worker's output dir."""
    from sftdist.config import compose_config
    from sftdist.engine.model import build_model, load_tokenizer

    tmp = tmp_path_factory.mktemp("zero3_load")
    cfg = compose_config([])
    pretrained = tmp / "tiny_hf"
    build_model(cfg.model, load_tokenizer(cfg.model), precision="fp32", activation_checkpointing=False,
                seed=cfg.train.seed).save_pretrained(pretrained, safe_serialization=True)
    script, out = tmp / "worker.py", tmp / "out"
    script.write_text(WORKER)
    out.mkdir()
    run_cmd([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
             str(script), str(out), str(pretrained)])
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)], pretrained, out


CASES = ["zero3", "zero3_pretrained"]


@pytest.mark.parametrize("case", CASES)
def test_zero3_model_has_the_full_model_shape(reports, case):
    ranks, _, _ = reports
    for r, rep in enumerate(ranks):
        assert rep["world_size"] == 2
        plain, zero3 = rep["zero0"], rep[case]
        assert plain["partitioned"] == 0 and plain["local"] == plain["full"] > 0, r
        assert zero3["params"] == plain["params"] and zero3["full"] == plain["full"], (r, zero3, plain)
        assert zero3["tied"] == plain["tied"] is True, r


@pytest.mark.parametrize("case", ["zero3", "zero3_pretrained"])
def test_zero3_rank_holds_half_of_the_model(reports, case):
    ranks, _, _ = reports
    for r, rep in enumerate(ranks):
        plain, zero3 = rep["zero0"], rep[case]
        assert zero3["partitioned"] == zero3["params"], (r, zero3)
        # Half of the elements per rank, plus the padding that makes each parameter divide evenly.
        assert 0.45 * plain["full"] <= zero3["local"] <= 0.6 * plain["full"], (r, zero3, plain)
    assert ranks[0][case]["local"] + ranks[1][case]["local"] >= ranks[0][case]["full"]


def test_zero3_from_pretrained_loads_the_saved_weights(reports):
    _, pretrained, out = reports
    saved = load_file(pretrained / "model.safetensors")
    gathered = load_file(out / "gathered.safetensors")
    assert gathered.keys() == saved.keys()
    for key, value in saved.items():
        assert gathered[key].shape == value.shape and gathered[key].dtype == value.dtype, key
        assert gathered[key].equal(value), key
