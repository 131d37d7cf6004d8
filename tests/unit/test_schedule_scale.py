"""The schedule of a million-sample mix: lengths are read once per column, never element by element from
datasets' lazy columns (each such read builds a dataset, which made packing a 1M epoch take minutes).

Speed itself is measured in bench/schedule_scale.py, not asserted here.
"""

import doctest
from itertools import chain

import numpy as np
import pyarrow as pa
import pytest

import sftdist.data.build
from sftdist.config import DataConfig
from sftdist.data.build import SourceData, TrainData, build_schedule, mix_report

datasets = pytest.importorskip("datasets")
Column = getattr(datasets.arrow_dataset, "Column", None)  # lazy columns arrived in datasets 4/5

MAX_LENGTH = 64  # short rows keep the test quick: it checks how lengths are read, not packing speed
SIZES = {"chat": 800_000, "text": 200_000}  # weights 1:1: text is drawn 2.5 times over


@pytest.fixture
def no_per_element_column_reads(monkeypatch):
    """Make ``dataset[column][i]`` fail: one such read costs what reading the whole column once does."""
    if Column is None:
        pytest.skip("this datasets version has no lazy Column")
    read = Column.__getitem__

    def guarded(self, key):
        if isinstance(key, int):
            raise AssertionError(f"per-element read {self.column_name}[{key}] of a lazy datasets column")
        return read(self, key)

    monkeypatch.setattr(Column, "__getitem__", guarded)


def million_sample_mix() -> tuple[TrainData, dict[str, np.ndarray], dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    data, tokens, supervised = [], {}, {}
    for name, n in SIZES.items():
        tokens[name] = rng.integers(1, MAX_LENGTH + 1, n)
        supervised[name] = rng.integers(1, tokens[name] + 1)
        table = pa.table({"num_tokens": tokens[name], "num_supervised": supervised[name]})
        stats = {"records": n, "kept": n, "statuses": {"ok": n},
                 "supervised_tokens": int(supervised[name].sum())}
        data.append(SourceData(name, 1.0, "messages", datasets.Dataset(table), None, stats))
    return TrainData(data), tokens, supervised


def test_million_sample_packed_schedule_and_mix_report(no_per_element_column_reads):
    data, tokens, supervised = million_sample_mix()
    names = list(SIZES)
    schedule = build_schedule(data, DataConfig(packing=True), seed=0, global_batch_size=64,
                              max_length=MAX_LENGTH)
    epoch = schedule.epoch(0)
    samples = [s for seq in epoch for s in seq]
    assert len(samples) == sum(SIZES.values())  # every drawn sample is packed exactly once
    src, rec = np.fromiter(chain.from_iterable(samples), np.int64, 2 * len(samples)).reshape(-1, 2).T
    drawn = np.bincount(src).tolist()
    assert drawn == [500_000, 500_000]

    # Every row respects max_length: the row sums, computed from the arrays the datasets were made of.
    first_record = np.cumsum([0, *SIZES.values()])[src]
    lengths = np.concatenate([tokens[name] for name in names])[first_record + rec]
    row_of = np.repeat(np.arange(len(epoch)), [len(seq) for seq in epoch])
    assert np.bincount(row_of, weights=lengths).max() <= MAX_LENGTH

    report = mix_report(data, schedule)
    assert [r["samples_per_epoch"] for r in report] == drawn
    assert sum(r["samples_per_epoch"] for r in report) == len(samples)
    sup = [int(supervised[name][rec[src == s]].sum()) for s, name in enumerate(names)]
    assert [r["supervised_token_share"] for r in report] == pytest.approx([x / sum(sup) for x in sup])
    assert [r["source"] for r in report] == names


def test_lengths_are_read_through_the_dataset_view(no_per_element_column_reads):
    ds = datasets.Dataset.from_dict({"num_tokens": [1, 9, 2, 9, 3], "num_supervised": [1, 9, 1, 9, 2]})
    view = ds.filter(lambda n: n < 9, input_columns="num_tokens").select([2, 0, 1])  # indices: 3, 1, 2
    stats = {"records": 5, "kept": 3, "statuses": {"ok": 3, "too_long": 2}, "supervised_tokens": 4}
    data = TrainData([SourceData("s", 1.0, "text", view, None, stats)])
    schedule = build_schedule(data, DataConfig(packing=True), seed=0, global_batch_size=1, max_length=4)
    # The view's lengths 3, 1, 2 pack as 3 + 1 and 2; the underlying table's 1, 9, 2 would not fit at all.
    assert sorted(sorted(i for _, i in seq) for seq in schedule.epoch(0)) == [[0, 1], [2]]
    assert mix_report(data, schedule)[0]["samples_per_epoch"] == 3


def test_docstring_examples():
    result = doctest.testmod(sftdist.data.build)
    assert result.attempted > 0 and result.failed == 0
