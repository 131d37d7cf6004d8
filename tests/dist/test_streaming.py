"""A streaming source (``streaming: true``, two JSONL shards by glob) mixed with a cached one, packed, on 2
CPU ranks: the run trains, each rank reads its own share, and a run resumed from its step-2 checkpoint
trains steps 3-4 exactly as the uninterrupted run did (same losses, grad norms and bit-identical weights),
because the checkpoint holds each rank's stream positions, packing buffer and RNG. A bad record that only
one rank reads stops both ranks with its file and line."""

import re
from pathlib import Path

import pytest
from safetensors.torch import load_file

from sftdist.config import ConfigError
from sftdist.data.demo import resolve_builtin
from sftdist.lifecycle.startup import check_stream_resume
from tests.conftest import FAST, read_metrics, train_torchrun


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """The demo chats as two train shards and a held-out eval file."""
    lines = Path(resolve_builtin("builtin:demo_chat")).read_text().splitlines()
    d = tmp_path_factory.mktemp("stream")
    (d / "part-0.jsonl").write_text("\n".join(lines[:60]) + "\n")
    (d / "part-1.jsonl").write_text("\n".join(lines[60:120]) + "\n")
    (d / "eval.jsonl").write_text("\n".join(lines[-24:]) + "\n")
    return d


def streamed(d: Path) -> list[str]:
    return [f"data.sources.0.path='{d}/part-*.jsonl'", "data.sources.0.streaming=true",
            "data.sources.0.eval_fraction=0", f"data.sources.0.eval_path={d}/eval.jsonl",
            "data.sources.0.max_samples=null", "data.stream_buffer=12", "data.packing=true", "train.max_steps=4",
            "train.save_every=2", "train.eval_every=2"]


@pytest.fixture(scope="module")
def whole(trained_runs, shards) -> Path:
    return trained_runs("stream_whole", 2, streamed(shards))


def test_a_streamed_mix_trains_on_two_ranks(whole):
    log = (whole / "stdout.txt").read_text()
    rows = read_metrics(whole)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(r["supervised_tokens"] > 0 for r in rows)
    assert all(r["loss/demo_chat"] > 0 and r["loss/demo_generic"] > 0 for r in rows), "both sources in every step"
    assert "data demo_chat: streamed" in log and "masks audited" in log
    assert any("eval_loss/demo_chat" in r for r in rows), "the streamed source evaluates on its eval_path"
    assert sorted(p.name for p in (whole / "checkpoints" / "step-2").glob("data_state_rank*.pt")) == \
        ["data_state_rank0.pt", "data_state_rank1.pt"]


def test_a_streamed_run_resumes_exactly(whole, shards, tmp_path):
    step2 = whole / "checkpoints" / "step-2"
    with pytest.raises(ConfigError, match="written by 2 process"):
        check_stream_resume(step2, streaming=True)  # (this process is a world of 1)
    run_dir = tmp_path / "resumed"
    train_torchrun(2, [*FAST, *streamed(shards), f"train.resume={step2}", f"output_dir={run_dir}"])
    resumed, ref = read_metrics(run_dir), read_metrics(whole)
    assert [r["step"] for r in resumed] == [3, 4]
    for key in ("loss", "grad_norm", "supervised_tokens", "tokens"):
        assert [r[key] for r in resumed] == [r[key] for r in ref[2:]], key
    a, b = load_file(run_dir / "final" / "model.safetensors"), load_file(whole / "final" / "model.safetensors")
    assert all(a[k].equal(b[k]) for k in b)


def test_a_bad_record_on_one_rank_stops_every_rank_naming_it(shards, tmp_path):
    """Line 10 of each shard is record 9 (or 69) of a pass: rank 1's share. Rank 0, which prints the
    error, never reads it, and learns it from rank 1 before either waits for the other."""
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("part-0.jsonl", "part-1.jsonl"):
        lines = (shards / name).read_text().splitlines()
        lines[9] = lines[9][:-3]
        (bad / name).write_text("\n".join(lines) + "\n")
    args = [a.replace(f"{shards}/part-", f"{bad}/part-") for a in streamed(shards)]
    proc = train_torchrun(2, [*FAST, *args, f"output_dir={tmp_path / 'run'}"], check=False)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert re.search(r"sftdist: error: \S+/bad/part-[01].jsonl: line 10: invalid JSON", out), out[-3000:]
    assert not (tmp_path / "run" / "checkpoints").exists()
