"""bench/gpu/bundle.py (make gpu-bundle): what ships to the GPU machine, and whether it fits the 64 MiB that
may travel there. No network: fake installed metadata, fake device tables, sparse fake wheels."""
import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("gpu_bundle", REPO / "bench" / "gpu" / "bundle.py")
bundle = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bundle)  # bench/ is no package: load the script by its path
Dist, MIB = bundle.Dist, bundle.MIB

# A small world: sftdist needs deepspeed (not on the device), transformers (there, older), tokenizers (there,
# another version but good enough), torch (the device's CUDA build) and a package only for old Pythons.
METADATA = {
    "deepspeed": Dist("0.19.8", ["torch>=2.0", "hjson", "pydantic>=2; python_version >= '3.8'"]),
    "hjson": Dist("3.1.0", []),
    "pydantic": Dist("2.14.4", ["typing-extensions>=4.16"]),
    "transformers": Dist("5.25.0", ["huggingface-hub>=2.4.0,<3", "tokenizers>=0.23.1,<0.24",
                                    "pytest; extra == 'testing'"]),
    "huggingface-hub": Dist("2.4.0", ["hf-xet>=1.6; platform_machine == 'x86_64'",
                                      "colorama; sys_platform == 'win32'"]),
    "tokenizers": Dist("0.23.3", ["huggingface-hub>=0.16.4"]),
    "accelerate": Dist("1.16.0", ["never-followed"]),
    "torch": Dist("2.13.0+cpu", ["sympy"]),
    "safetensors": Dist("0.8.0", []),
    "wandb": Dist("0.31.0", ["pydantic>=2.6", "opentelemetry-api>=1.43"]),
    "opentelemetry-api": Dist("1.45.2", []),
}
DEVICE = {"transformers": "5.17.0", "huggingface-hub": "1.33.0", "tokenizers": "0.23.2",
          "accelerate": "1.15.0", "torch": "2.11.0", "safetensors": "0.8.0", "typing-extensions": None,
          "hf-xet": None}
ROOTS = {"sftdist": ["deepspeed>=0.16", "transformers>=4.56", "tokenizers>=0.21", "accelerate", "torch>=2.4",
                     "safetensors>=0.4", "wandb>=0.18", "importlib-resources; python_version < '3.9'"],
         "bench": ["bitsandbytes==0.50.2"]}
METADATA_WITH_BENCH = METADATA | {"bitsandbytes": Dist("0.50.2", ["torch>=2.4,<3", "numpy>=1.17"])}


def select(roots=ROOTS, metadata=METADATA_WITH_BENCH, device=DEVICE):
    return bundle.select_distributions(roots, metadata, device)


def shipped(decisions):
    return {name: d.version for name, d in decisions.items() if d.ship}


def test_ships_the_closure_the_device_lacks_at_our_versions():
    decisions = select()
    assert shipped(decisions) == {
        "deepspeed": "0.19.8", "hjson": "3.1.0", "pydantic": "2.14.4", "wandb": "0.31.0",
        "opentelemetry-api": "1.45.2", "bitsandbytes": "0.50.2", "numpy": None,  # numpy: in the next test
        "transformers": "5.25.0", "huggingface-hub": "2.4.0"}
    assert "importlib-resources" not in decisions  # python_version < '3.9' does not apply on 3.12
    assert "pytest" not in decisions and "colorama" not in decisions  # an extra; a Windows-only need


def test_a_package_to_ship_that_is_not_installed_here_has_no_version():
    """main() stops on these (numpy here stands for a bench extra's need that .venv lacks)."""
    assert select()["numpy"].version is None and select()["numpy"].reason == "not on the device"


def test_torch_is_never_shipped_even_when_a_requirement_fails_on_the_device():
    roots = {"sftdist": ["torch>=2.12"]}
    decision = select(roots)["torch"]
    assert not decision.ship and decision.version == "2.11.0"
    assert "WARNING" in decision.reason and "sftdist>=2.12" in decision.reason


def test_version_mismatch_ships_ours_only_for_pinned_packages_or_unmet_needs():
    decisions = select()
    # transformers: the device's 5.17.0 meets >=4.56, but our code and tests pin ours
    assert decisions["transformers"].ship and "pin" in decisions["transformers"].reason
    # huggingface-hub: shipped only because our transformers needs >=2.4.0 and the device has 1.33.0
    assert decisions["huggingface-hub"].ship
    assert decisions["huggingface-hub"].reason == "the device's 1.33.0 fails transformers<3,>=2.4.0"
    # tokenizers and accelerate differ from ours, but the device's meet every need: theirs stay
    assert not decisions["tokenizers"].ship and decisions["tokenizers"].version == "0.23.2"
    assert not decisions["accelerate"].ship and "meets" in decisions["accelerate"].reason
    assert not decisions["safetensors"].ship
    assert decisions["safetensors"].reason == "the device has the same version"


def test_hub_stays_the_devices_when_nothing_shipped_needs_a_newer_one():
    roots = {"sftdist": ["tokenizers>=0.21", "huggingface-hub>=0.30"]}
    decisions = select(roots)
    assert shipped(decisions) == {}
    assert decisions["huggingface-hub"].version == "1.33.0"


def test_the_devices_own_copies_bring_their_own_needs():
    """accelerate stays the device's, so what our accelerate needs is never looked at."""
    assert "never-followed" not in select()
    assert "sympy" not in select()  # torch is not shipped either


def test_a_device_package_of_unread_version_is_assumed_to_fit_and_says_so():
    decisions = select()
    assert not decisions["typing-extensions"].ship
    assert "assumed to meet pydantic>=4.16" in decisions["typing-extensions"].reason
    peft = bundle.decide("peft", "0.21.2", [("sftdist", ">=0.15")], {"peft": None})
    assert peft.ship and peft.version == "0.21.2"


def test_the_real_device_table_keeps_torch_and_ships_our_transformers():
    assert bundle.DEVICE_HAS["torch"] == "2.11.0" and "pyarrow" in bundle.DEVICE_HAS
    decisions = bundle.select_distributions(ROOTS, METADATA_WITH_BENCH, bundle.DEVICE_HAS)
    assert not decisions["torch"].ship and decisions["transformers"].ship and decisions["deepspeed"].ship


def test_optional_groups_leave_shared_needs_behind():
    groups = bundle.optional_groups(ROOTS, METADATA_WITH_BENCH, DEVICE, ("bitsandbytes", "wandb"))
    assert groups["bitsandbytes"] == {"bitsandbytes", "numpy"}
    assert groups["wandb"] == {"wandb", "opentelemetry-api"}  # pydantic stays: deepspeed needs it too


def test_size_verdict_in_words():
    assert bundle.size_verdict(60 * MIB) == "fits: 60.0 MiB of 64.0 MiB (4.0 to spare)"
    assert bundle.size_verdict(64 * MIB).startswith("fits")
    assert bundle.size_verdict(64 * MIB + 1).startswith("over by 0.0 MiB")
    assert bundle.size_verdict(70 * MIB) == "over by 6.0 MiB: 70.0 MiB of 64.0 MiB"


GROUPS = {"bitsandbytes": {"bitsandbytes"}, "wandb": {"wandb", "opentelemetry-api"}}


def test_nothing_is_dropped_when_the_bundle_fits():
    fit = bundle.fit_to_limit({"transformers": 13 * MIB, "bitsandbytes": 41 * MIB}, 7 * MIB, GROUPS)
    assert fit.dropped == [] and fit.total == 61 * MIB and fit.message == bundle.size_verdict(61 * MIB)


def test_bitsandbytes_goes_first_and_wandb_stays_if_that_is_enough():
    sizes = {"transformers": 13 * MIB, "bitsandbytes": 41 * MIB, "wandb": 19 * MIB, "opentelemetry-api": MIB}
    fit = bundle.fit_to_limit(sizes, 7 * MIB, GROUPS)
    assert fit.dropped == ["bitsandbytes"] and fit.total == 40 * MIB
    assert fit.message == ("over by 17.0 MiB: 81.0 MiB of 64.0 MiB; dropped optional bitsandbytes "
                           "(41.0 MiB: bitsandbytes); fits: 40.0 MiB of 64.0 MiB (24.0 to spare)")


def test_wandb_and_its_own_needs_go_second():
    sizes = {"transformers": 45 * MIB, "bitsandbytes": 10 * MIB, "wandb": 19 * MIB, "opentelemetry-api": MIB}
    fit = bundle.fit_to_limit(sizes, 4 * MIB, GROUPS)
    assert fit.dropped == ["bitsandbytes", "wandb"] and fit.total == 49 * MIB
    assert "dropped optional wandb (20.0 MiB: opentelemetry-api, wandb)" in fit.message


def test_required_wheels_that_do_not_fit_are_named():
    sizes = {"transformers": 60 * MIB, "deepspeed": 5 * MIB, "bitsandbytes": 41 * MIB}
    fit = bundle.fit_to_limit(sizes, 2 * MIB, GROUPS)  # no wandb wheel here: nothing of it to drop
    assert fit.dropped == ["bitsandbytes"] and fit.total > bundle.SIZE_LIMIT_BYTES
    assert fit.message.endswith("over by 3.0 MiB: 67.0 MiB of 64.0 MiB; the required wheels alone do not "
                                "fit; biggest: transformers 60.0 MiB, deepspeed 5.0 MiB")


@pytest.mark.parametrize("filename, ok", [
    ("deepspeed-0.19.8-py3-none-any.whl", True),
    ("multiprocess-0.70.19-py312-none-any.whl", True),
    ("pydantic_core-2.50.5-cp312-cp312-manylinux2014_x86_64.manylinux_2_17_x86_64.whl", True),
    ("deepspeed-0.19.8-cp311-cp311-linux_x86_64.whl", False),
    ("pydantic_core-2.50.5-cp312-cp312-manylinux_2_17_aarch64.whl", False),
])
def test_installable_on_device(filename, ok):
    assert bundle.installable_on_device(filename) is ok


def fake_wheel(folder: Path, name: str, version: str, size: int) -> Path:
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with path.open("wb") as wheel:
        wheel.truncate(size)  # sparse: only st_size counts
    return path


def test_sync_removes_stale_versions_and_wheels_not_shipped(tmp_path):
    fake_wheel(tmp_path, "peft", "0.20.0", 10)
    fake_wheel(tmp_path, "peft", "0.21.2", 10)
    fake_wheel(tmp_path, "torch", "2.13.0", 10)
    bundle.sync_wheels(tmp_path, {"peft": "0.21.2"})  # peft 0.21.2 is there: nothing to fetch
    assert sorted(p.name for p in tmp_path.iterdir()) == ["peft-0.21.2-py3-none-any.whl"]


@pytest.mark.parametrize("check_only", [False, True])
def test_report_drops_optional_wheels_and_writes_the_manifest(tmp_path, check_only):
    fake_wheel(tmp_path, "transformers", "5.25.0", 13 * MIB)
    bnb = fake_wheel(tmp_path, "bitsandbytes", "0.50.2", 60 * MIB)
    status = bundle.report_and_manifest(REPO, tmp_path, {"bitsandbytes": {"bitsandbytes"}}, check_only,
                                        {"python": "3.12.3", "torch": "2.13.0+cpu"})
    manifest = json.loads((tmp_path / "MANIFEST.json").read_text())
    assert bnb.exists() is check_only and status == (1 if check_only else 0)
    assert manifest["dropped_optional"] == ([] if check_only else ["bitsandbytes"])
    kept = ["bitsandbytes", "transformers"] if check_only else ["transformers"]
    assert [w["name"] for w in manifest["wheels"]] == kept
    assert manifest["total_bytes"] == sum(w["bytes"] for w in manifest["wheels"]) + manifest["repo_bytes"]


def test_report_fails_when_required_wheels_are_too_big(tmp_path, capsys):
    fake_wheel(tmp_path, "transformers", "5.25.0", 70 * MIB)
    assert bundle.report_and_manifest(REPO, tmp_path, {}, False, {}) == 1
    out, err = capsys.readouterr()
    assert "the required wheels alone do not fit; biggest: transformers 70.0 MiB" in out
    assert "does not fit" in err
