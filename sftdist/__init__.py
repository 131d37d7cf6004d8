"""sftdist: distributed supervised fine-tuning of chat LLMs with Hydra configs and DeepSpeed ZeRO.

Importing the package is cheap: it never imports DeepSpeed or wandb. It sets the third-party warning
policy (``quiet_third_party_warnings``), here because this is the one module every sftdist process imports
first: each console script, ``python -m sftdist.*``, every torchrun rank.
"""

import sys
import warnings

__version__ = "0.1.0"

# (message regex, category, module regex) of the third-party warnings that are not the user's business: one
# library's call into another, which no config or data change can remove, printed by every process (some
# every step). Warnings about the user's config or data, and sftdist's own, are never listed here.
QUIET_WARNINGS = (
    # DeepSpeed's ZeRO stages call torch's old collective names on every step; a DeepSpeed release will
    # switch.
    (r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated", FutureWarning,
     r"torch\.distributed"),
    # peft reads transformers' renamed `is_gradient_checkpointing` property when it wraps a model.
    (r"`is_gradient_checkpointing` is deprecated", FutureWarning, r"transformers"),
)


def quiet_third_party_warnings() -> None:
    """Ignore the ``QUIET_WARNINGS`` in this process, unless the user chose warning filters of their own
    (``python -W``, ``PYTHONWARNINGS``): then every warning shows as they asked."""
    if sys.warnoptions:
        return
    for message, category, module in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)


quiet_third_party_warnings()
