"""The extreme-step log: records, bounded size, checkpoint round trip, the ids a resumed run must skip."""

from __future__ import annotations

import io

import pytest
import torch

from megatron_video.optim import ExtremeStepLog, gather_sample_ids


def test_record_bound_and_round_trip():
    log = ExtremeStepLog(max_entries=2)
    log.record(5, [7, 3], float("nan"))
    log.record(9, [11], 1e6)
    log.record(12, [4, 2], float("inf"))
    assert [e["iteration"] for e in log.entries] == [9, 12]  # the oldest entry dropped
    assert log.sample_ids() == {11, 4, 2}
    buf = io.BytesIO()
    torch.save(log.state_dict(), buf)
    buf.seek(0)
    again = ExtremeStepLog()
    again.load_state_dict(torch.load(buf, weights_only=True))
    assert again.sample_ids() == log.sample_ids() and again.max_entries == 2
    assert again.entries[1]["sample_ids"] == [2, 4]
    with pytest.raises(KeyError, match="malformed"):
        again.load_state_dict({"entries": [{"iteration": 1}]})
    with pytest.raises(ValueError, match="max_entries"):
        ExtremeStepLog(0)


def test_gather_single_process():
    assert gather_sample_ids([5, 3, 5]) == [3, 5]
