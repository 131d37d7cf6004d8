"""Load checkpoints without running code from them: every ``torch.load`` inside ``weights_only_loads()``
is ``weights_only=True``, DeepSpeed's own loads included.

A ``.pt`` file is a pickle, and unpickling with ``weights_only=False`` can call any function the file names
(``os.system``, ...). DeepSpeed 0.19.8 loads checkpoints that way: ``TorchCheckpointEngine.load`` (model and
optimizer states on resume), the universal-checkpoint loaders and ``ds_to_universal``, and ``zero_to_fp32``
all pass ``weights_only=False`` explicitly, and its checkpoint engine has no option to change that. So a
checkpoint directory that someone else could write to (a shared ``output_dir``, a downloaded run) would be
code execution on resume. Inside the guard torch's weights-only unpickler accepts tensors, plain containers
and numbers, plus exactly the four non-tensor types that DeepSpeed's own checkpoints hold (found by loading
the files of ZeRO-0/1/2/3 and LoRA checkpoints written by sftdist); anything else is refused with
``UnsafeCheckpointError``, before the pickle can call it.

``python -m sftdist.lifecycle.safe_load MODULE [ARGS...]`` runs a module (``deepspeed.checkpoint.ds_to_universal``,
``deepspeed.utils.zero_to_fp32``) as ``__main__`` under the same guard.
"""

from __future__ import annotations

import os
import pickle
import runpy
import sys
from contextlib import contextmanager
from typing import Iterator

from sftdist.config.checks import ConfigError

FORCE = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"  # torch's own switch: weights_only=True even where a call says False
FORCE_OFF = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"  # must be unset while FORCE is set (torch refuses both)
# (module, name) of the non-tensor types pickled into DeepSpeed checkpoints: the ZeRO stage of the optimizer
# states, their (static or fp16-dynamic) loss scaler, and the fragment map of ZeRO-1/2 and bf16 optimizers.
DEEPSPEED_GLOBALS = (("deepspeed.runtime.zero.config", "ZeroStageEnum"),
                     ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
                     ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
                     ("deepspeed.utils.tensor_fragment", "fragment_address"))


class UnsafeCheckpointError(ConfigError):
    """A checkpoint file whose pickle needs something other than tensors and DeepSpeed's checkpoint types.

    A ``ConfigError``: the run stops with one line naming the file, as for any other input it cannot use.
    """


def deepspeed_globals() -> list:
    """The classes of ``DEEPSPEED_GLOBALS`` (imports DeepSpeed)."""
    import importlib

    return [getattr(importlib.import_module(module), name) for module, name in DEEPSPEED_GLOBALS]


@contextmanager
def weights_only_loads() -> Iterator[None]:
    """Within the block, every ``torch.load`` of this process is ``weights_only=True``, allowing only
    ``DEEPSPEED_GLOBALS`` beyond what torch allows anyway.

    ``torch.load`` itself is wrapped so that a refusal names the file; the ``TORCH_FORCE_WEIGHTS_ONLY_LOAD``
    variable also catches loads that reach ``torch.serialization.load`` by another name, and subprocesses
    started inside the block inherit it.

    Raises:
        UnsafeCheckpointError: when a loaded file's pickle names any other global (nothing of it has run).
    """
    import torch

    original = torch.load

    def guarded_load(f, *args, **kwargs):
        kwargs["weights_only"] = True
        try:
            return original(f, *args, **kwargs)
        except pickle.UnpicklingError as e:
            why = next((line.strip() for line in str(e).splitlines() if "GLOBAL" in line), "an unknown object")
            raise UnsafeCheckpointError(
                f"refusing to load {f}: it is not only tensors and DeepSpeed checkpoint data ({why}); "
                f"loading it could run code stored in the file. Use checkpoints only from a source you trust.") from e

    saved = {k: os.environ.pop(k, None) for k in (FORCE, FORCE_OFF)}
    os.environ[FORCE] = "1"
    torch.load = guarded_load
    try:
        with torch.serialization.safe_globals(deepspeed_globals()):
            yield
    finally:
        torch.load = original
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def main(argv: list[str] | None = None) -> None:
    """``python -m sftdist.lifecycle.safe_load MODULE [ARGS...]``: run ``MODULE`` as a script under the guard."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0].startswith("-"):
        sys.exit("usage: python -m sftdist.lifecycle.safe_load MODULE [ARGS...]  (e.g. deepspeed.utils.zero_to_fp32)")
    sys.argv = args
    try:
        with weights_only_loads():
            runpy.run_module(args[0], run_name="__main__", alter_sys=True)
    except UnsafeCheckpointError as e:
        sys.exit(f"sftdist.lifecycle.safe_load: error: {e}")


if __name__ == "__main__":
    main()
