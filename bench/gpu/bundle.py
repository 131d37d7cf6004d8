"""Fill .whl/ with the wheels and test assets a GPU machine without network needs to run our benchmarks.

Why: the device image (/work/.library/device/KINDS.md) holds torch's CUDA build, transformers and much of the
stack, but not deepspeed, datasets, hydra, wandb or the benchmark's extras (trl, liger-kernel, bitsandbytes).
All that travels to the device (the repo's files plus carried folders) must stay under 64 MiB, so this ships
only what the device lacks, or has at a version our code cannot use, pinned to what pyproject.toml resolved
to in the running venv. The device installs it with
`python3 -m pip install --no-index --no-deps --target /tmp/site .whl/*.whl` (bench/gpu/README.md).

Run: .venv/bin/python bench/gpu/bundle.py [--dest .whl] [--check-only]
"""
import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path
from typing import NamedTuple

from packaging import tags
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

MIB = 2**20
SIZE_LIMIT_BYTES = 64 * MIB  # device README: all that travels in one call

# /work/.library/device/KINDS.md, the 'pip list' row (2026-11): versions seen on the device image.
DEVICE_VERSIONS = {
    "accelerate": "1.15.0", "botorch": "0.18.1", "cupy-cuda13x": "14.2.0", "gpytorch": "1.15.2",
    "huggingface-hub": "1.33.0", "jax": "0.11.2", "jax-cuda13-pjrt": "0.11.2", "jax-cuda13-plugin": "0.11.2",
    "jaxlib": "0.11.2", "jaxtyping": "0.3.11", "numpy": "2.5.2", "numpyro": "0.21.0", "onnx": "1.23.1",
    "onnx-ir": "1.0.0", "onnxruntime": "1.30.0", "onnxscript": "0.7.2", "pytorch-lightning": "2.6.6",
    "safetensors": "0.8.0", "sentence-transformers": "6.0.1", "sentencepiece": "0.2.2", "tiktoken": "0.14.0",
    "tokenizers": "0.23.2", "torch": "2.11.0", "torch-geometric": "2.8.0.post1", "torchaudio": "2.11.0",
    "torchdiffeq": "0.2.5", "torchmetrics": "1.9.0", "torchvision": "0.26.0", "transformers": "5.17.0",
    "triton": "3.6.0",
}
# KINDS.md, 'Python packages already there' (read on 2026-11-17): present at a version not read (None).
DEVICE_NAMES_ONLY = """absl-py aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs build
certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers
flax fonttools formulaic frozenlist fsspec grpcio h11 h5py hf-xet httpcore httpx humanize hypothesis idna
imageio iniconfig interface-meta jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities
linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes
mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba
numba-cuda nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13
nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx opencv-python-headless optax
opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy
portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing
pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pyyaml regex requests rich sacrebleu scikit-build-core scikit-image scikit-learn scipy
seaborn setuptools shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard
tensorboard-data-server tensorstore threadpoolctl tifffile timm toolz tqdm treescope typer
typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp"""
DEVICE_HAS: dict[str, str | None] = {name: None for name in DEVICE_NAMES_ONLY.split()} | DEVICE_VERSIONS

OURS_WHEN_DIFFERENT = {"transformers", "peft"}  # our code and tests pin their behaviour
DEVICE_BUILD_ONLY = {"torch", "triton"}  # the device's CUDA builds stay, whatever version we have here
# Not in .venv: the newest on the index (2026-12); the device and we meet their torch/transformers needs.
BENCH_EXTRA_PINS = {"trl": "1.16.0", "liger-kernel": "0.8.5", "bitsandbytes": "0.50.2"}
OPTIONAL_IN_DROP_ORDER = ("bitsandbytes", "wandb")  # the benchmark runs without them (8-bit optim, W&B)

# Linux CPython 3.12 x86-64, no extras: the device's python3 (3.12.3)
DEVICE_MARKERS = {"implementation_name": "cpython", "os_name": "posix", "platform_machine": "x86_64",
                  "platform_python_implementation": "CPython", "platform_system": "Linux", "extra": "",
                  "sys_platform": "linux", "python_version": "3.12", "python_full_version": "3.12.3"}
# The device README's pip download platforms; pip matches N exactly, so WIDER is tried when those find none.
BASE_PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
                  "manylinux2014_x86_64", "manylinux1_x86_64"]
WIDER_PLATFORMS = ["manylinux_2_24_x86_64", "manylinux_2_31_x86_64", "manylinux_2_34_x86_64",
                   "manylinux_2_35_x86_64"]
_ALL_PLATFORMS = BASE_PLATFORMS + WIDER_PLATFORMS + ["linux_x86_64"]
DEVICE_TAGS = {*tags.cpython_tags((3, 12), ["cp312"], _ALL_PLATFORMS),
               *tags.compatible_tags((3, 12), "cp312", _ALL_PLATFORMS)}
ASSETS = {"tokenizers/qwen2": "assets/tokenizer-qwen2",  # ../shared/<key> -> <dest>/<value>
          "datasets/llamafactory_alpaca_en_demo.json": "assets/llamafactory_alpaca_en_demo.json"}


class Dist(NamedTuple):
    version: str | None
    requires: list[str]


class Decision(NamedTuple):
    name: str
    version: str | None  # what the device will import: ours if shipped, else the device's (None: not read)
    ship: bool
    reason: str


class Fit(NamedTuple):
    dropped: list[str]  # optional roots whose wheels go, in OPTIONAL_IN_DROP_ORDER
    total: int  # bytes that travel once they are gone
    message: str


def applicable_requirements(requires: list[str]) -> list[Requirement]:
    """The requirements that apply on the device (Linux CPython 3.12 x86-64), extras left out.

    >>> [str(r) for r in applicable_requirements(['a>=1', 'b; python_version < "3.9"', 'c; extra == "dev"'])]
    ['a>=1']
    """
    parsed = [Requirement(line) for line in requires]
    return [r for r in parsed if r.marker is None or r.marker.evaluate(DEVICE_MARKERS)]


def decide(name: str, ours: str | None, demands: list[tuple[str, str]], device_has: dict) -> Decision:
    """Ship ours or use the device's copy of one distribution; demands are (requirer, specifier) pairs.

    >>> decide("hf-hub", "2.4.0", [("transformers", ">=2.4.0")], {"hf-hub": "1.33.0"}).reason
    "the device's 1.33.0 fails transformers>=2.4.0"
    """
    if name not in device_has:
        return Decision(name, ours, True, "not on the device")
    device = device_has[name]
    unmet = [f"{who}{spec}" for who, spec in demands
             if device and not SpecifierSet(spec).contains(device, prereleases=True)]
    if name in DEVICE_BUILD_ONLY:
        warning = f"; WARNING: fails {', '.join(unmet)}" if unmet else ""
        return Decision(name, device, False, f"the device's own (CUDA) build stays{warning}")
    if device is None:
        if name in OURS_WHEN_DIFFERENT:
            return Decision(name, ours, True, "on the device at a version not read; our tests pin ours")
        needs = sorted({f"{who}{spec}" for who, spec in demands if spec})
        return Decision(name, None, False, "on the device (version not read)"
                        + (f"; assumed to meet {', '.join(needs)}" if needs else ""))
    if ours is not None and Version(device) == Version(ours):
        return Decision(name, device, False, "the device has the same version")
    if name in OURS_WHEN_DIFFERENT:
        return Decision(name, ours, True, f"the device has {device}; our code and tests pin ours")
    if unmet:
        return Decision(name, ours, True, f"the device's {device} fails {', '.join(unmet)}")
    return Decision(name, device, False, f"the device's {device} meets what the shipped packages need")


def select_distributions(roots: dict[str, list[str]], metadata: dict[str, Dist],
                         device_has: dict) -> dict[str, Decision]:
    """Decide, over the requirement closure of roots, what ships; only shipped packages' needs are followed
    (the device's own copies come with theirs). Shipping one package can make the device's copy of another
    too old, so this repeats to a fixed point.

    >>> meta = {"a": Dist("1", ["b>=2"]), "b": Dist("2", [])}
    >>> device = {"b": "1", "torch": "2.11.0"}
    >>> {n: d.ship for n, d in select_distributions({"sftdist": ["a", "torch"]}, meta, device).items()}
    {'a': True, 'torch': False, 'b': True}
    """
    shipped: set[str] = set()
    while True:
        demands: dict[str, list[tuple[str, str]]] = {}
        sources = list(roots.items()) + [(n, metadata[n].requires) for n in sorted(shipped) if n in metadata]
        for requirer, requires in sources:
            for req in applicable_requirements(requires):
                demands.setdefault(canonicalize_name(req.name), []).append((requirer, str(req.specifier)))
        decisions = {name: decide(name, metadata.get(name, Dist(None, [])).version, needs, device_has)
                     for name, needs in demands.items()}
        now_shipped = {name for name, decision in decisions.items() if decision.ship}
        if now_shipped == shipped:
            return decisions
        shipped = now_shipped


def optional_groups(roots: dict[str, list[str]], metadata: dict[str, Dist], device_has: dict,
                    optional: tuple[str, ...]) -> dict[str, set[str]]:
    """For each optional root, the shipped packages that only it brings (what dropping it saves).

    >>> meta = {"a": Dist("1", ["c"]), "w": Dist("1", ["c", "w-core"]), "c": Dist("1", [])}
    >>> sorted(optional_groups({"sftdist": ["a", "w"]}, meta | {"w-core": Dist("1", [])}, {}, ("w",))["w"])
    ['w', 'w-core']
    """
    def shipped(some_roots):
        return {n for n, d in select_distributions(some_roots, metadata, device_has).items() if d.ship}
    everything, groups = shipped(roots), {}
    for name in optional:
        without = {who: [r for r in reqs if canonicalize_name(Requirement(r).name) != name]
                   for who, reqs in roots.items()}
        groups[name] = everything - shipped(without)
    return groups


def size_verdict(total: int, limit: int = SIZE_LIMIT_BYTES) -> str:
    """The total against the limit, in words: 'over by 6.0 MiB: 70.0 MiB of 64.0 MiB' for 70 MiB."""
    of_limit = f"{total / MIB:.1f} MiB of {limit / MIB:.1f} MiB"
    if total <= limit:
        return f"fits: {of_limit} ({(limit - total) / MIB:.1f} to spare)"
    return f"over by {(total - limit) / MIB:.1f} MiB: {of_limit}"


def fit_to_limit(wheel_bytes: dict[str, int], other_bytes: int, groups: dict[str, set[str]],
                 limit: int = SIZE_LIMIT_BYTES) -> Fit:
    """Drop optional groups of wheels (those in wheel_bytes), in their order, until the total fits the limit.

    >>> fit = fit_to_limit({"torch": 40 * MIB, "bnb": 30 * MIB}, 2 * MIB, {"bnb": {"bnb"}})
    >>> fit.dropped, fit.message.split("; ")
    (['bnb'], ['over by 8.0 MiB: 72.0 MiB of 64.0 MiB', 'dropped optional bnb (30.0 MiB: bnb)', \
'fits: 42.0 MiB of 64.0 MiB (22.0 to spare)'])
    """
    total = sum(wheel_bytes.values()) + other_bytes
    dropped, notes = [], [size_verdict(total, limit)]
    for name, members in groups.items():
        members = members & wheel_bytes.keys()
        if total <= limit:
            break
        if not members:
            continue
        saved = sum(wheel_bytes.get(member, 0) for member in members)
        dropped.append(name)
        notes.append(f"dropped optional {name} ({saved / MIB:.1f} MiB: {', '.join(sorted(members))})")
        total -= saved
    if dropped:
        notes.append(size_verdict(total, limit))
    if total > limit:
        kept = wheel_bytes.keys() - set().union(*(groups[name] for name in dropped))
        biggest = sorted(kept, key=lambda name: -wheel_bytes[name])[:4]
        notes.append("the required wheels alone do not fit; biggest: "
                     + ", ".join(f"{name} {wheel_bytes[name] / MIB:.1f} MiB" for name in biggest))
    return Fit(dropped, total, "; ".join(notes))


def installable_on_device(filename: str) -> bool:
    """Whether a wheel's tags install on CPython 3.12 x86-64 Linux.

    >>> [installable_on_device(f) for f in ("deepspeed-0.19.8-py3-none-any.whl", "a-1-cp311-none-any.whl")]
    [True, False]
    """
    return bool(parse_wheel_filename(filename)[3] & DEVICE_TAGS)


def installed_metadata() -> dict[str, Dist]:
    """name -> Dist of the running venv's distributions (the first of a name on sys.path wins, as import)."""
    found: dict[str, Dist] = {}
    for dist in importlib.metadata.distributions():
        if name := dist.metadata["Name"]:
            found.setdefault(canonicalize_name(name), Dist(dist.version, dist.requires or []))
    return found


def wheels_in(dest: Path) -> dict[str, tuple[str, Path]]:
    """name -> (version, path) of the wheels in dest."""
    found = {}
    for path in sorted(dest.glob("*.whl")):
        name, version, _, _ = parse_wheel_filename(path.name)
        found[name] = (str(version), path)
    return found


def wheel_dist(path: Path) -> Dist:
    """The version and Requires-Dist lines in a wheel's METADATA."""
    with zipfile.ZipFile(path) as wheel:
        meta_name = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
        meta = Parser().parsestr(wheel.read(meta_name).decode())
    return Dist(meta["Version"], meta.get_all("Requires-Dist") or [])


def fetch_wheel(name: str, version: str, dest: Path) -> None:
    """A binary wheel for the device; failing that, one built here from the sdist (deepspeed, antlr4)."""
    spec = f"{name}=={version}"
    print(f"  fetching {spec}", flush=True)
    for platforms in (BASE_PLATFORMS, BASE_PLATFORMS + WIDER_PLATFORMS):
        command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                   "--python-version", "3.12", "--implementation", "cp", "-d", str(dest), spec]
        command += [f"--platform={platform_tag}" for platform_tag in platforms]
        if subprocess.run(command, capture_output=True, check=False).returncode == 0:
            return
    print(f"  {spec}: no binary wheel for the device; building one here from the sdist", flush=True)
    # DS_BUILD_OPS=0: a pure deepspeed wheel whose ops JIT-build on the GPU machine; no build isolation so
    # that its setup.py imports our torch; no cache so that a wheel built earlier with ops is not reused.
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            "--no-cache-dir", "-w", str(dest), spec], env=os.environ | {"DS_BUILD_OPS": "0"},
                           capture_output=True, text=True, check=False)
    if built.returncode != 0:
        raise SystemExit(f"bundle: could not build {spec}:\n{built.stdout}{built.stderr}")
    wheel_path = wheels_in(dest)[canonicalize_name(name)][1]
    with zipfile.ZipFile(wheel_path) as wheel:
        compiled = [n for n in wheel.namelist() if n.endswith(".so")]
    if not installable_on_device(wheel_path.name) or compiled:
        wheel_path.unlink()
        raise SystemExit(f"bundle: {wheel_path.name} is no pure wheel for CPython 3.12 x86-64 {compiled[:3]}")
    print(f"  built {wheel_path.name}: installs on CPython 3.12 x86-64, no compiled extensions")


def copy_assets(shared: Path, dest: Path) -> None:
    if not shared.is_dir():
        print(f"assets: no {shared}; the device script falls back to sftdist's demo tokenizer and data")
        return
    for source, target in ASSETS.items():
        if (shared / source).is_dir():
            shutil.copytree(shared / source, dest / target, dirs_exist_ok=True)
        else:
            (dest / target).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(shared / source, dest / target)


def travelling_repo_bytes(repo: Path, dest: Path) -> int:
    """The repo's files that travel to the device (tracked + untracked-not-ignored), dest's own left out."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=repo, check=True,
                            capture_output=True, text=True).stdout.split("\0")
    paths = [repo / p for p in listed if p and (repo / p).exists()]
    return sum(p.lstat().st_size for p in paths if not p.resolve().is_relative_to(dest.resolve()))


def bench_extras_metadata(dest: Path, fetch: bool) -> dict[str, Dist]:
    """The pinned benchmark extras' metadata, read from their wheels (fetched into dest if fetch)."""
    extras = {}
    for name, version in BENCH_EXTRA_PINS.items():
        version_here, path = wheels_in(dest).get(name, (None, None))
        if fetch and version_here != version:  # a dropped optional one comes back from pip's cache
            fetch_wheel(name, version, dest)
            version_here, path = wheels_in(dest)[name]
        extras[name] = wheel_dist(path) if version_here == version else Dist(version, [])
    return extras


def sync_wheels(dest: Path, shipped: dict[str, str]) -> None:
    """Leave dest one wheel, at the shipped version, of each shipped package: two versions of one package
    stop the device's install, and a wheel left over from another bundle would be installed too."""
    for path in sorted(dest.glob("*.whl")):  # not wheels_in: it keeps one of two versions
        name, version, _, _ = parse_wheel_filename(path.name)
        if name not in shipped or version != Version(shipped[name]):
            print(f"  removing {path.name}: this bundle ships {name} {shipped.get(name) or 'not at all'}")
            path.unlink()
    present = wheels_in(dest)
    for name, version in shipped.items():
        if name not in present:
            fetch_wheel(name, version, dest)


def report_and_manifest(repo: Path, dest: Path, groups: dict[str, set[str]], check_only: bool,
                        pinned_from: dict[str, str]) -> int:
    """Drop optional wheels until the bundle travels, print the table, write MANIFEST.json; exit status."""
    wheels = wheels_in(dest)
    assets = sorted(p for p in (dest / "assets").rglob("*") if p.is_file())
    assets_bytes, repo_bytes = sum(p.stat().st_size for p in assets), travelling_repo_bytes(repo, dest)
    wheel_bytes = {name: path.stat().st_size for name, (_, path) in wheels.items()}
    fit = fit_to_limit(wheel_bytes, assets_bytes + repo_bytes, groups)
    for name in [] if check_only else fit.dropped:
        for member in groups[name] & wheels.keys():
            wheels.pop(member)[1].unlink()
    rows = sorted(((n, v, p.stat().st_size) for n, (v, p) in wheels.items()), key=lambda row: -row[2])
    rows += [("assets (tokenizer, data)", "", assets_bytes), ("repo files that travel", "", repo_bytes)]
    width = max(len(row[0]) for row in rows) + 2
    print(f"\n{'package':<{width}}{'version':<12}{'MiB':>8}")
    for name, version, size in rows:
        print(f"{name:<{width}}{version:<12}{size / MIB:>8.2f}")
    total = sum(size for _, _, size in rows)
    print(f"{'total':<{width + 12}}{total / MIB:>8.2f}  (limit {SIZE_LIMIT_BYTES // MIB} MiB)\n{fit.message}")
    if check_only and fit.dropped:
        print("--check-only deleted nothing: a run without it drops those wheels")
    manifest = {"date": datetime.date.today().isoformat(), "pinned_from": pinned_from,
                "dropped_optional": [name for name in groups if name not in wheels],  # this run or an earlier
                "wheels": [{"file": p.name, "name": n, "version": v, "bytes": p.stat().st_size}
                           for n, (v, p) in wheels.items()],
                "assets": [{"path": str(p.relative_to(dest)), "bytes": p.stat().st_size} for p in assets],
                "repo_bytes": repo_bytes, "total_bytes": total, "limit_bytes": SIZE_LIMIT_BYTES}
    (dest / "MANIFEST.json").write_text(json.dumps(manifest, indent=1) + "\n")
    if total > SIZE_LIMIT_BYTES:
        print(f"bundle: does not fit what may travel to the device ({size_verdict(total)})", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", default=".whl", help="the bundle folder (relative to the repo root); "
                        "wheels in it that this bundle does not ship are deleted")
    parser.add_argument("--check-only", action="store_true", help="no network: size check and manifest only")
    args = parser.parse_args(argv)
    repo = Path(__file__).resolve().parents[2]
    dest = repo / args.dest
    dest.mkdir(parents=True, exist_ok=True)

    metadata = installed_metadata() | bench_extras_metadata(dest, fetch=not args.check_only)
    roots = {"sftdist": metadata["sftdist"].requires,
             "bench": [f"{name}=={version}" for name, version in BENCH_EXTRA_PINS.items()]}
    decisions = select_distributions(roots, metadata, DEVICE_HAS)
    print("what ships (+) and what the device's own copy covers (=):")
    width = max(map(len, decisions)) + 2
    for d in sorted(decisions.values(), key=lambda d: (not d.ship, d.name)):
        print(f"  {'+' if d.ship else '='} {d.name:<{width}}{d.version or '?':<12}{d.reason}")
    shipped = {d.name: d.version for d in decisions.values() if d.ship}
    if unversioned := sorted(n for n, v in shipped.items() if v is None):
        raise SystemExit(f"bundle: must ship {unversioned} but they are not installed here; pin them")
    if not args.check_only:
        sync_wheels(dest, shipped)
        copy_assets(repo.parent / "shared", dest)
    groups = optional_groups(roots, metadata, DEVICE_HAS, OPTIONAL_IN_DROP_ORDER)
    pinned_from = {"python": platform.python_version(), "torch": metadata["torch"].version}
    return report_and_manifest(repo, dest, groups, args.check_only, pinned_from)


if __name__ == "__main__":
    sys.exit(main())
