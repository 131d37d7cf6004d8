"""With several ranks the data stage runs once per node: local rank 0 tokenises while the others wait on a
long-timeout gloo group, then find the cache."""

import re

from tests.conftest import FAST, read_metrics, train_torchrun


def test_two_ranks_tokenise_once(tmp_path):
    cache = tmp_path / "cache"
    proc = train_torchrun(2, [*FAST, f"data.cache_dir={cache}", f"output_dir={tmp_path / 'run'}"])
    # The data stage says when it starts tokenising a source; once per source means one rank did the work.
    assert len(re.findall(r"tokenising demo_chat: \d+ records, \d+ worker", proc.stderr)) == 1, proc.stderr
    assert len(re.findall(r"tokenising demo_generic: \d+ records, \d+ worker", proc.stderr)) == 1
    assert sorted(p.name.split("-")[0] for p in cache.iterdir()) == ["demo_chat", "demo_generic"]
    assert len(read_metrics(tmp_path / "run")) == 3


def test_bad_data_stops_every_rank_with_one_message(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]}\n'
                   '{"messages": [{"role": "wizard", "content": "x"}]}\n')
    proc = train_torchrun(2, [*FAST, f"data.cache_dir={tmp_path / 'cache'}", f"output_dir={tmp_path / 'run'}",
                              f"data.sources=[{{name: mine, path: {bad}}}]"], check=False)
    assert proc.returncode != 0
    assert proc.stderr.count(f"{bad}: line 2: message 0 has unknown role 'wizard'") == 1
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
