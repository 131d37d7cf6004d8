"""Run ``sftdist-train`` on many command lines in one process and report, per case, how it ended.

The bad-input table (``tests/unit/test_bad_inputs.py``) has dozens of cases; a fresh interpreter for each
would spend most of the test importing torch and DeepSpeed. This script imports once and calls the real
entry point ``sftdist.train.main()`` for each case with its own ``sys.argv``, capturing what it prints.

``build_model`` is wrapped to record whether a case got as far as loading the model; for the cases that
must fail before that, it raises instead of loading. Input: a JSON file ``[{"argv": [...], "pre_model":
bool}, ...]``; output: a JSON file ``[{"exit": code, "output": text, "model_loaded": bool}, ...]``.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys


class ModelLoaded(Exception):
    """A case that should have failed before loading the model reached ``build_model``."""


def run_case(argv: list[str], pre_model: bool) -> dict:
    import sftdist.engine.model as models
    import sftdist.train as train

    real_build = models.build_model
    loaded = []

    def build_model(*args, **kwargs):
        loaded.append(True)
        if pre_model:
            raise ModelLoaded("the model was loaded before the error")
        return real_build(*args, **kwargs)

    models.build_model = build_model  # where sftdist.train looks it up
    out = io.StringIO()
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            sys.argv = ["sftdist-train", *argv]
            try:
                train.main()
            except SystemExit as e:  # sys.exit("message") carries the message as its code
                code = e.code
                if isinstance(code, str):
                    out.write(code + "\n")
                    code = 1
    except BaseException as e:  # noqa: BLE001 - report anything else as a crash of the case
        out.write(f"Traceback (escaped the CLI): {type(e).__name__}: {e}\n")
        code = 1
    finally:
        models.build_model = real_build
    return {"exit": code if code is not None else 0, "output": out.getvalue(), "model_loaded": bool(loaded)}


def main() -> None:
    cases_file, results_file = sys.argv[1:3]  # read first: each case replaces sys.argv
    cases = json.loads(open(cases_file).read())
    results = [run_case(c["argv"], c["pre_model"]) for c in cases]
    with open(results_file, "w") as fh:
        json.dump(results, fh)


if __name__ == "__main__":
    main()
