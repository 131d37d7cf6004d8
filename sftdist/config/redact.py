"""Keep secrets (W&B keys, Hugging Face tokens, passwords) out of what a run writes and logs.

sftdist has no config key for a secret: the hub client and wandb read their tokens from the environment. But
a value can still resolve to one: ``run_name=${oc.env:HF_TOKEN}`` (Hydra resolves it) puts the token itself
into ``config.yaml``, the W&B run config and name, the SLURM job name and console lines, all of which are
shared more widely than the environment is. So before anything is written, every string is scrubbed of the
value of each secret-named environment variable (replaced by its ``${oc.env:NAME}``, so a reloaded config
still resolves), and the value of any dict key named like a secret (``from_config: {token: ...}``) is
replaced by ``<redacted>``. A secret typed in literally, with no variable holding it, cannot be recognised.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping, Optional

# Variables holding secrets: HF_TOKEN, HUGGING_FACE_HUB_TOKEN, WANDB_API_KEY, AWS_SECRET_ACCESS_KEY, DB_PASSWORD,
# ... but not TOKENIZERS_PARALLELISM.
SECRET_VAR = re.compile(r"(^|_)(TOKEN|API_?KEY|SECRET|PASSWORD|PASSWD|ACCESS_KEY)(_|$)", re.IGNORECASE)
# Config keys naming one: token, hf_token, api_key, password, ... but not pad_token_id, eos_token (a tokenizer's
# special token) or loss_chunk_tokens.
SECRET_KEY = re.compile(r"^(?!(bos|eos|pad|unk|sep|cls|mask)_token$).*(^|_)(token|api_?key|secret(_key)?|password"
                        r"|passwd|access_key)$", re.IGNORECASE)
MIN_SECRET_LEN = 8  # shorter values ("1", "true") are flags, and replacing them would mangle unrelated text
REDACTED = "<redacted>"


def secret_values(environ: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    """``{value: NAME}`` of the secret-named variables in ``environ`` (default ``os.environ``), longest first.

    Example:
        >>> secret_values({"HF_TOKEN": "hf_abcdefgh123", "TOKENIZERS_PARALLELISM": "false", "PATH": "/usr/bin"})
        {'hf_abcdefgh123': 'HF_TOKEN'}
    """
    environ = os.environ if environ is None else environ
    found = {v: k for k, v in environ.items() if SECRET_VAR.search(k) and len(v.strip()) >= MIN_SECRET_LEN}
    return dict(sorted(found.items(), key=lambda kv: -len(kv[0])))  # a longer secret may contain a shorter one


def redact_text(text: str, secrets: Optional[dict[str, str]] = None) -> str:
    """``text`` with each secret value replaced by ``${oc.env:NAME}``.

    Example:
        >>> redact_text("revision: hf_abcdefgh123", {"hf_abcdefgh123": "HF_TOKEN"})
        'revision: ${oc.env:HF_TOKEN}'
    """
    for value, name in (secret_values() if secrets is None else secrets).items():
        text = text.replace(value, "${oc.env:" + name + "}")
    return text


def redact(obj: Any, secrets: Optional[dict[str, str]] = None) -> Any:
    """A copy of a config container (dicts, lists, scalars) with secret values and secret-named keys redacted.

    Example:
        >>> redact({"model": {"revision": "x-hf_abcdefgh123"}, "columns": {"api_key": "k"}, "max_new_tokens": 8},
        ...        {"hf_abcdefgh123": "HF_TOKEN"})
        {'model': {'revision': 'x-${oc.env:HF_TOKEN}'}, 'columns': {'api_key': '<redacted>'}, 'max_new_tokens': 8}
    """
    secrets = secret_values() if secrets is None else secrets
    if isinstance(obj, Mapping):
        return {k: REDACTED if isinstance(k, str) and SECRET_KEY.search(k) and v not in (None, "")
                else redact(v, secrets) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact(v, secrets) for v in obj]
    return redact_text(obj, secrets) if isinstance(obj, str) else obj


def redact_yaml(text: str) -> str:
    """A YAML config with ``redact`` applied; the text itself when nothing needed redacting."""
    import yaml
    from omegaconf import OmegaConf

    data = yaml.safe_load(text)
    clean = redact(data)
    return text if clean == data else OmegaConf.to_yaml(OmegaConf.create(clean))
