"""``train.kernels`` (sftdist/engine/kernels.py) on a CPU: ``none`` touches nothing; ``liger`` without
liger-kernel, with one too old or without CUDA names why and leaves the model exactly as it was; with a
stand-in Liger it asks for the layer kernels and never for Liger's cross-entropy, and undoes a patch that
fails; the fused head refuses what it cannot compute and runs through the head's module call, so that a
ZeRO-3 partitioned head gathers its weight and gets its gradient (a real one-rank ZeRO-3 engine)."""

import json
import sys
import types
from importlib import metadata

import pytest
import torch
import torch.nn.functional as F

from sftdist.engine import kernels
from tests.conftest import run_cmd


def tiny_llama(**extra):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **extra)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)


def fingerprint(model) -> dict:
    """What a patch could change: module classes and names, per-instance methods, the modeling module's
    names, and a forward's logits."""
    modeling = sys.modules[type(model).__module__]
    ids = torch.arange(1, 17).view(2, 8)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    return {"types": [type(m) for m in model.modules()], "names": [m._get_name() for m in model.modules()],
            "instance_methods": [sorted(k for k, v in vars(m).items() if callable(v) and not isinstance(
                v, torch.nn.Module)) for m in model.modules()],
            "modeling": dict(vars(modeling)), "logits": logits}


def assert_untouched(model, before: dict) -> None:
    after = fingerprint(model)
    assert torch.equal(after.pop("logits"), before["logits"])  # bit for bit
    assert after == {k: v for k, v in before.items() if k != "logits"}


@pytest.fixture(autouse=True)
def fresh_liger_check():
    """``_liger_missing`` is asked once per process; each test sets up its own process state."""
    kernels._liger_missing.cache_clear()
    yield
    kernels._liger_missing.cache_clear()


@pytest.fixture
def fake_liger(monkeypatch):
    """A stand-in liger-kernel 0.8.5 on a CUDA machine; its patch table starts empty."""
    table = {}
    monkeypatch.setattr(kernels.metadata, "version",
                        lambda name: "0.8.5" if name == "liger-kernel" else metadata.version(name))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for name in ("liger_kernel", "liger_kernel.transformers", "liger_kernel.transformers.functional"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkey_patch = types.ModuleType("liger_kernel.transformers.monkey_patch")
    monkey_patch.MODEL_TYPE_TO_APPLY_LIGER_FN = table
    monkeypatch.setitem(sys.modules, monkey_patch.__name__, monkey_patch)
    return table


def test_none_touches_nothing():
    model = tiny_llama()
    before = fingerprint(model)
    assert kernels.apply(model, "none") == ""
    assert not kernels.fused_head_available(model, "none")
    assert_untouched(model, before)


@pytest.mark.parametrize("version, cuda, why", [
    (None, True, "liger-kernel is not installed"),
    ("0.8.1", True, "older than 0.8.2"),  # per-token losses with wrong weight gradients
    ("0.8.5", False, "no CUDA GPU"),
])
def test_liger_unavailable_names_why_and_leaves_the_model(monkeypatch, version, cuda, why):
    def liger_version(name):
        if name != "liger-kernel":
            return metadata.version(name)
        if version is None:
            raise metadata.PackageNotFoundError(name)
        return version

    monkeypatch.setattr(kernels.metadata, "version", liger_version)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    model = tiny_llama()
    before = fingerprint(model)
    line = kernels.apply(model, "liger")
    assert why in line and "nothing patched" in line, line
    assert_untouched(model, before)
    assert not kernels.fused_head_available(model, "liger")
    assert kernels.fused_losses(model.lm_head, torch.randn(3, 64), torch.tensor([1, 2, 3])) is None


def test_this_host_falls_back_whatever_is_installed():
    """Here (no GPU) ``liger`` can only fall back, with a reason, and the fused head is never taken."""
    model = tiny_llama()
    before = fingerprint(model)
    line = kernels.apply(model, "liger")
    assert "nothing patched" in line and ("not installed" in line or "no CUDA" in line), line
    assert_untouched(model, before)
    assert kernels.fused_losses(model.lm_head, torch.randn(3, 64), torch.tensor([1, 2, 3])) is None


@pytest.mark.parametrize("act, swiglu", [("silu", True), ("gelu", False)])
def test_liger_asks_for_the_layer_kernels_and_never_its_cross_entropy(fake_liger, act, swiglu):
    asked = {}

    def apply_liger_kernel_to_llama(rope=True, cross_entropy=False, fused_linear_cross_entropy=True,
                                    rms_norm=True, swiglu=True, model=None):
        asked.update(rope=rope, cross_entropy=cross_entropy, fused_linear_cross_entropy=fused_linear_cross_entropy,
                     rms_norm=rms_norm, swiglu=swiglu, model=model)

    fake_liger["llama"] = apply_liger_kernel_to_llama
    model = tiny_llama(hidden_act=act)
    line = kernels.apply(model, "liger")
    assert asked == {"rope": True, "cross_entropy": False, "fused_linear_cross_entropy": False,
                     "rms_norm": True, "swiglu": swiglu, "model": model}
    assert ("patched llama's rope, rms_norm, swiglu;" if swiglu else "patched llama's rope, rms_norm;") in line
    assert "liger-kernel 0.8.5" in line and "fuses its cross-entropy" in line, line


def test_unknown_model_type_keeps_its_layers(fake_liger):
    model = tiny_llama()
    before = fingerprint(model)
    line = kernels.apply(model, "liger")
    assert "model type 'llama' has no Liger kernels" in line and "fuses its cross-entropy" in line, line
    assert_untouched(model, before)


def test_a_patch_that_fails_halfway_is_undone(fake_liger):
    def apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, model=None):
        from transformers.models.llama import modeling_llama

        modeling_llama.apply_rotary_pos_emb = lambda *a, **k: None
        model.model.norm.forward = lambda x: x * 0
        vars(model.model.layers[0])["_modules"]["mlp"] = torch.nn.Identity()
        raise RuntimeError("no such attribute")

    fake_liger["llama"] = apply_liger_kernel_to_llama
    model = tiny_llama()
    before = fingerprint(model)
    line = kernels.apply(model, "liger")
    assert "patch failed (RuntimeError: no such attribute)" in line, line
    assert_untouched(model, before)


def test_fused_head_refusals(fake_liger):
    from peft import LoraConfig, get_peft_model

    from sftdist.engine.forward import head_logits

    model = tiny_llama()
    assert kernels.fused_head_available(model, "liger") and not kernels.fused_head_available(model, "none")
    for scaling, fused in ((4.0, True), (3.0, False)):  # Granite-style: exact by a power of two only
        model.config.logits_scaling = scaling
        assert kernels.fused_head_available(model, "liger") is fused
        scale, _ = kernels.logit_transforms(model)
        hidden = torch.randn(5, 64)
        torch.testing.assert_close(model.lm_head(hidden * scale), head_logits(model, hidden))
    model.config.logits_scaling = None
    model.config.final_logit_softcapping = 0.5  # Liger caps itself
    assert kernels.logit_transforms(model) == (1.0, 0.5) and kernels.fused_head_available(model, "liger")
    model.config.final_logit_softcapping = None
    lora = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))
    assert not kernels.fused_head_available(lora.get_base_model(), "liger")
    assert "LM head is a peft.tuners.lora.layer.Linear, not a plain nn.Linear" in kernels.fused_head_refusal(lora.get_base_model())
    # Off CUDA, or a head it cannot take, fused_losses hands back to the plain path.
    rows, targets = torch.randn(3, 64), torch.tensor([1, 2, 3])
    assert kernels.fused_losses(lora.get_base_model().lm_head, rows, targets) is None
    assert kernels.fused_losses(tiny_llama().lm_head, rows, targets) is None


def test_the_fused_forward_runs_as_the_head_module_call():
    """Hooks on the head (where DeepSpeed gathers and releases a ZeRO-3 weight) see the call; the head's own
    forward is back afterwards, also after an error and when it had a per-instance one."""
    head = torch.nn.Linear(8, 11, bias=False)
    seen = []
    head.register_forward_pre_hook(lambda m, args: seen.append(("pre", args[0].shape)))
    head.register_forward_hook(lambda m, args, out: seen.append(("post", out.shape)))
    hidden, targets = torch.randn(4, 8, requires_grad=True), torch.tensor([0, 3, 10, 2])

    def loss(module, h, t):
        return F.cross_entropy(F.linear(h, module.weight), t, reduction="none")

    losses = kernels._run_as_forward(head, loss, hidden, targets)
    assert seen == [("pre", (4, 8)), ("post", (4,))] and "forward" not in vars(head)
    losses.sum().backward()
    assert head.weight.grad is not None and hidden.grad is not None
    with pytest.raises(ValueError):
        kernels._run_as_forward(head, lambda m, h, t: (_ for _ in ()).throw(ValueError()), hidden, targets)
    assert "forward" not in vars(head)
    head.forward = own = lambda h: h
    kernels._run_as_forward(head, loss, hidden, targets)
    assert vars(head)["forward"] is own


ZERO3_HEAD = '''
"""A ZeRO-3 partitioned head under kernels' module call (argv[1]: "stand-in", a CPU function with Liger's
reduction="none" contract; "liger": kernels.fused_losses on CUDA): per-token losses and gradients equal those
of a plain copy, with unequal per-token weights."""
import copy
import json
import sys

import torch
import torch.nn.functional as F
from deepspeed.utils import safe_get_full_grad

from sftdist.config import ParallelConfig, TrainConfig
from sftdist.engine import kernels
from sftdist.engine.deepspeed_wrap import build_ds_config, wrap_with_deepspeed
from sftdist.engine.distributed import init_distributed


class DeferredCrossEntropy(torch.autograd.Function):
    """Like Liger's: saves detached input and weight in forward, recomputes the gradients in backward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets):
        ctx.save_for_backward(hidden.detach(), weight.detach(), targets)
        return F.cross_entropy(hidden @ weight.t(), targets, reduction="none")

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, targets = ctx.saved_tensors
        with torch.enable_grad():
            h, w = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
            return (*torch.autograd.grad(F.cross_entropy(h @ w.t(), targets, reduction="none"), (h, w), grad),
                    None)


class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.head = torch.nn.Linear(16, 16), torch.nn.Linear(16, 40, bias=False)

    def forward(self, x):  # the model's own head on one row, as with logits_to_keep=1
        hidden = torch.tanh(self.body(x))
        return hidden, self.head(hidden[:1])


def per_token(head, hidden, targets):
    if sys.argv[1] == "liger":
        return kernels.fused_losses(head, hidden, targets)
    return kernels._run_as_forward(head, lambda m, h, t: DeferredCrossEntropy.apply(h, m.weight, t), hidden,
                                   targets)


init_distributed()
device = "cuda" if sys.argv[1] == "liger" else "cpu"
torch.manual_seed(0)
model = Model().to(device)
plain = copy.deepcopy(model)
x, targets = torch.randn(12, 16, device=device), torch.randint(0, 40, (12,), device=device)
weights = torch.rand(12, device=device)
ds_config = build_ds_config(ParallelConfig(zero_stage=3), TrainConfig(micro_batch_size=1, global_batch_size=1, lr=1e-3),
                            dp_world=1, precision="fp32", gpu=device == "cuda")
ds_config["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # partition even a tiny head
engine = wrap_with_deepspeed(model, [{"params": list(model.parameters())}], ds_config, lambda s: 1.0)
head = engine.module.head
hidden, _ = engine(x)
partitioned = hasattr(head.weight, "ds_id") and head.weight.numel() == 0
losses = per_token(head, hidden, targets)
engine.backward((losses * weights).sum())
ref = F.cross_entropy(plain.head(plain(x)[0]), targets, reduction="none")
(ref * weights).sum().backward()
print("ZERO3 " + json.dumps({
    "partitioned": partitioned, "released": head.weight.numel() == 0,
    "losses": (losses - ref).abs().max().item(),
    "head_grad": (safe_get_full_grad(head.weight) - plain.head.weight.grad).abs().max().item(),
    "body_grad": (safe_get_full_grad(engine.module.body.weight) - plain.body.weight.grad).abs().max().item()}))
'''


def zero3_head(tmp_path, mode: str) -> dict:
    script = tmp_path / "zero3_head.py"
    script.write_text(ZERO3_HEAD)
    proc = run_cmd([sys.executable, str(script), mode])
    return json.loads(proc.stdout.split("ZERO3 ", 1)[1].splitlines()[0])


def test_zero3_partitioned_head_gathers_and_gets_its_gradient(tmp_path):
    got = zero3_head(tmp_path, "stand-in")
    assert got["partitioned"] and got["released"], got
    assert got["losses"] < 1e-6 and got["head_grad"] < 1e-6 and got["body_grad"] < 1e-6, got
