"""Two environments on one machine alternate runs without rebuilding DeepSpeed's ops: each builds them once,
in its own directory (build_locks.use_env_extensions_dir), instead of rebuilding every op on every switch.

Each "run" here is a run's first phase, ``init_distributed``: that is where the directory is chosen, before the
first op (the shm all-reduce) loads, and every later op of the run is built where that one was. So the second
environment compiles one op (~40 s on 2 cores) rather than the two of a whole training run (~3 min); that
training runs go through ``init_distributed`` is what every other run in the suite shows."""

import shutil
import sys
import sysconfig
from pathlib import Path

from tests.conftest import REPO, run_cmd


def second_env() -> Path:
    """The python of a second virtual environment that sees this one's packages, except for its own copy of
    DeepSpeed. A clone with its own venv differs by that: DeepSpeed's install path is in the ops' build
    commands (with every package shared, the build files would be the same, and a shared build root would not
    rebuild either). Kept between sessions, so that its ops are built once, not on every test run."""
    import deepspeed

    env = REPO / ".pytest_cache" / f"second-env-deepspeed-{deepspeed.__version__}"
    site = Path(sysconfig.get_paths(vars={"base": str(env)})["purelib"])
    if not (site / "deepspeed" / "__init__.py").exists():
        run_cmd([sys.executable, "-m", "venv", "--without-pip", "--clear", str(env)])
        (site / "zz_first_env.pth").write_text(
            f"import site; site.addsitedir({sysconfig.get_paths()['purelib']!r})\n")
        shutil.copytree(Path(deepspeed.__file__).parent, site / "deepspeed")
    return env / "bin" / "python"


OPS = ("deepspeed_shm_comm",)  # the op a run's process group loads on CPU


def own_dir(python: Path) -> Path:
    """``python``'s environment's extension directory."""
    code = "from sftdist.engine.build_locks import env_extensions_dir; print(env_extensions_dir())"
    return Path(run_cmd([str(python), "-c", code]).stdout.strip().splitlines()[-1])


def op_libraries(folder: Path) -> dict[Path, float]:
    """The libraries of ``OPS`` under torch's build folder, with their mtimes: in every environment's
    directory, and where torch builds when nobody picks a directory (``<folder>/<op>``)."""
    return {so: so.stat().st_mtime for pattern in ("*/*.so", "*/*/*.so") for so in folder.glob(pattern)
            if so.stem in OPS}


def start_run(python: Path) -> None:
    """A run's start in the environment of ``python``: its process group, which loads (or builds) the op."""
    run_cmd([str(python), "-c", "from sftdist.engine.distributed import init_distributed; init_distributed()"],
            timeout=600)


def test_two_environments_alternate_without_rebuilding(monkeypatch):
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)  # each run picks its environment's directory
    env_a, env_b = Path(sys.executable), second_env()
    dir_a, dir_b = own_dir(env_a), own_dir(env_b)
    assert dir_a != dir_b and dir_a.parent == dir_b.parent
    folder = dir_a.parent
    start_run(env_a)  # may build A's ops (the first run of this environment)
    before_b = op_libraries(folder)
    start_run(env_b)  # may build B's ops, in B's directory only
    after_b = op_libraries(folder)
    assert all((d / op / f"{op}.so") in after_b for d in (dir_a, dir_b) for op in OPS), sorted(after_b)
    rebuilt = [so for so, mtime in after_b.items() if before_b.get(so) != mtime]
    assert all(so.is_relative_to(dir_b) for so in rebuilt), rebuilt
    start_run(env_a)
    assert op_libraries(folder) == after_b  # nothing rebuilt on the way back
