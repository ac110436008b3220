"""ShapeBatchSampler: one shape per global batch on every DP rank, exact resume, peers identical."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from megatron_video.data.sampler import EmptyEpochError, ShapeBatchSampler
from megatron_video.data.shapes import encode_key


def uneven_keys(n: int = 3000, seed: int = 0) -> np.ndarray:
    """Many buckets with very uneven sizes, a few excluded (-1) samples, some tiny buckets."""
    rng = np.random.default_rng(seed)
    shapes = [(t, h, w) for t in (1, 17, 33, 57) for h, w in ((144, 256), (256, 144), (192, 256), (256, 256))]
    weights = rng.pareto(1.0, len(shapes)) + 0.05
    pick = rng.choice(len(shapes), n, p=weights / weights.sum())
    keys = np.array([encode_key(*shapes[i]) for i in pick], np.int64)
    keys[rng.random(n) < 0.02] = -1
    return keys


def run_epochs(keys: np.ndarray, gbs: int, mbs: int, dp: int, epochs: int, **kw: object
               ) -> list[list[list[int]]]:
    """Per rank: the flat list of micro-batches over `epochs` epochs."""
    out = []
    for r in range(dp):
        s = ShapeBatchSampler(keys, gbs, mbs, r, dp, seed=3, **kw)
        out.append([mb for _ in range(epochs) for mb in s])
    return out


@pytest.mark.parametrize("dp", [1, 2, 4, 8])
def test_one_shape_per_global_batch_every_rank(dp: int) -> None:
    keys = uneven_keys()
    mbs, gbs = 2, 2 * dp * 3  # three micro-batches per rank per step
    per_rank = run_epochs(keys, gbs, mbs, dp, epochs=3)
    steps = gbs // (mbs * dp)
    assert len({len(r) for r in per_rank}) == 1 and len(per_rank[0]) % steps == 0
    epoch_len = ShapeBatchSampler(keys, gbs, mbs, 0, dp, seed=3).samples_per_epoch
    for g in range(len(per_rank[0]) // steps):
        ids = [i for r in per_rank for mb in r[g * steps:(g + 1) * steps] for i in mb]
        assert len(ids) == gbs and len(set(ids)) == gbs  # a full global batch without repeats
        assert len({int(keys[i]) for i in ids}) == 1, f"global batch {g} mixes shapes"
        assert all(keys[i] >= 0 for i in ids)
    # each epoch covers every kept sample at most once, and the epochs are different permutations
    flat = [i for g in range(len(per_rank[0]) // steps) for r in per_rank
            for mb in r[g * steps:(g + 1) * steps] for i in mb]
    epochs = [flat[e * epoch_len:(e + 1) * epoch_len] for e in range(3)]
    assert all(len(set(e)) == epoch_len for e in epochs)
    assert epochs[0] != epochs[1]


def test_small_buckets_dropped_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    keys = np.array([encode_key(17, 64, 64)] * 40 + [encode_key(1, 32, 32)] * 7, np.int64)
    with caplog.at_level(logging.WARNING):
        s = ShapeBatchSampler(keys, 8, 2, 0, 2, min_bucket_batches=2)
    assert s.dropped_small_buckets == {(1, 32, 32): 7}
    assert "dropped 7 samples" in caplog.text and "1x32x32" in caplog.text
    assert s.samples_per_epoch == 40 and s.bucket_summary() == {(17, 64, 64): 40}
    with pytest.raises(ValueError, match="no shape bucket"):
        ShapeBatchSampler(keys[40:], 8, 2, 0, 2)


def test_drop_last_false_completes_buckets() -> None:
    keys = np.array([encode_key(1, 8, 8)] * 10 + [encode_key(9, 8, 8)] * 13, np.int64)
    s = ShapeBatchSampler(keys, 4, 1, 0, 1, drop_last=False)
    batches = s.epoch_batches(0)
    assert batches.shape == (3 + 4, 4)
    assert set(batches.ravel().tolist()) == set(range(23))  # nobody left out
    assert all(len({int(keys[i]) for i in b}) == 1 for b in batches)
    # a held-out set smaller than one global batch: each bucket still fills a batch, every member in it
    small = ShapeBatchSampler(keys[8:13], 8, 2, 0, 2, drop_last=False)
    batches = small.epoch_batches(0)
    assert batches.shape == (2, 8) and small.dropped_small_buckets == {}
    assert sorted(set(batches[0].tolist()) | set(batches[1].tolist())) == [0, 1, 2, 3, 4]
    assert all(len({int(keys[8:13][i]) for i in b}) == 1 for b in batches)


def test_resume_from_any_step_yields_exact_remainder() -> None:
    keys = uneven_keys(800, seed=1)
    gbs, mbs, dp = 12, 2, 3
    ref = [ShapeBatchSampler(keys, gbs, mbs, r, dp, seed=5) for r in range(dp)]
    full = [[mb for _ in range(2) for mb in s] for s in ref]  # two epochs
    per_epoch = len(full[0]) // 2
    for stop in [0, 1, 5, per_epoch - 1, per_epoch, per_epoch + 7, 2 * per_epoch - 1]:
        for r in range(dp):
            s = ShapeBatchSampler(keys, gbs, mbs, r, dp, seed=5)
            it = (mb for _ in range(2) for mb in s)
            head = [next(it) for _ in range(stop)]
            state = s.state_dict()
            resumed = ShapeBatchSampler(keys, gbs, mbs, r, dp, seed=5)
            resumed.load_state_dict(state)
            rest = [mb for _ in range(2) for mb in resumed]
            rest = rest[:len(full[r]) - stop]
            assert head + rest == full[r], f"rank {r} resumed at micro-batch {stop}"


def test_resume_from_loop_counter_and_other_dp_size() -> None:
    keys = uneven_keys(600, seed=2)
    gbs = 8
    one = ShapeBatchSampler(keys, gbs, 2, 0, 1, seed=9)
    order = [i for mb in one for i in mb]
    # the loop's own total counter: 3 global batches consumed; resume on 2 DP ranks, micro-batch 1
    state = one.state_dict(total_consumed_samples=3 * gbs)
    got = []
    for r in range(2):
        s = ShapeBatchSampler(keys, gbs, 1, r, 2, seed=9)
        s.load_state_dict(state)
        got.append([i for mb in s for i in mb])
    steps = gbs // 2
    merged = [i for g in range(len(got[0]) // steps) for mb in range(steps) for r in range(2)
              for i in [got[r][g * steps + mb]]]
    assert merged == order[3 * gbs:]


def test_state_mismatch_is_an_error() -> None:
    keys = uneven_keys(500)
    s = ShapeBatchSampler(keys, 8, 2, 0, 2, seed=1)
    state = s.state_dict()
    other_keys = keys.copy()
    other_keys[0] = encode_key(5, 5, 5) if keys[0] != encode_key(5, 5, 5) else -1
    for bad, field in [(ShapeBatchSampler(other_keys, 8, 2, 0, 2, seed=1), "keys_digest"),
                       (ShapeBatchSampler(keys, 16, 2, 0, 2, seed=1), "global_batch_size"),
                       (ShapeBatchSampler(keys, 8, 2, 0, 2, seed=2), "seed")]:
        with pytest.raises(ValueError, match=field):
            bad.load_state_dict(state)
    with pytest.raises(ValueError, match="multiple"):
        ShapeBatchSampler(keys, 8, 4, 0, 2, seed=1).load_state_dict({**state, "consumed_samples": 2})


def test_model_parallel_peers_identical_and_seeded() -> None:
    keys = uneven_keys(400)
    # TP/CP/PP peers of one replica construct the sampler with the same dp rank
    a = [mb for mb in ShapeBatchSampler(keys, 8, 2, 1, 2, seed=4)]
    b = [mb for mb in ShapeBatchSampler(keys.copy(), 8, 2, 1, 2, seed=4)]
    c = [mb for mb in ShapeBatchSampler(keys, 8, 2, 1, 2, seed=5)]
    assert a == b and a != c


def test_skip_ids_skip_whole_global_batch_on_every_rank() -> None:
    keys = uneven_keys(500)
    ref = ShapeBatchSampler(keys, 8, 2, 0, 2, seed=1)
    batches = ref.epoch_batches(0)
    bad = int(batches[3, 5])
    runs = []
    for r in range(2):
        s = ShapeBatchSampler(keys, 8, 2, r, 2, seed=1, skip_ids=[bad])
        runs.append([i for mb in s for i in mb])
        assert s.skipped_batches == 1
    seen = set(runs[0]) | set(runs[1])
    assert bad not in seen and not (set(batches[3].tolist()) & seen)
    assert len(seen) == ref.samples_per_epoch - 8
    # the skip list travels with the state
    s = ShapeBatchSampler(keys, 8, 2, 0, 2, seed=1)
    s.add_skip_ids([bad])
    t = ShapeBatchSampler(keys, 8, 2, 0, 2, seed=1)
    t.load_state_dict(s.state_dict())
    assert t.skip_ids == {bad}


def test_bad_arguments() -> None:
    keys = uneven_keys(100)
    with pytest.raises(ValueError, match="multiple of micro_batch_size"):
        ShapeBatchSampler(keys, 10, 2, 0, 3)
    with pytest.raises(ValueError, match="dp_rank"):
        ShapeBatchSampler(keys, 8, 2, 2, 2)
    with pytest.raises(ValueError, match="1-D integer"):
        ShapeBatchSampler(keys.astype(float), 8, 2, 0, 1)


def _peer_samples(tp: int, cp: int) -> dict:
    from megatron.core import parallel_state as ps

    from megatron_video.data.dataset import global_bad_sample_count
    from megatron_video.parallel import initialize_parallel

    initialize_parallel(tensor_model_parallel_size=tp, context_parallel_size=cp)
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    s = ShapeBatchSampler(uneven_keys(300), 8, 2, dp_rank, dp_size, seed=11)
    total_bad = global_bad_sample_count(ps.get_tensor_model_parallel_rank() + 1)
    return {"dp_rank": dp_rank, "dp_size": dp_size, "tp_rank": ps.get_tensor_model_parallel_rank(),
            "cp_rank": ps.get_context_parallel_rank(), "batches": [mb for mb in s], "bad": total_bad}


@pytest.mark.slow
@pytest.mark.parametrize("tp,cp", [(2, 1), (1, 2)])
def test_peers_identical_under_megatron_groups(tp: int, cp: int) -> None:
    from tests.harness import run_distributed

    results = run_distributed(_peer_samples, 4, tp, cp)
    assert {r["dp_size"] for r in results} == {2}
    by_dp: dict[int, list] = {}
    for r in results:
        by_dp.setdefault(r["dp_rank"], []).append(r["batches"])
    assert sorted(by_dp) == [0, 1]
    for peers in by_dp.values():
        assert len(peers) == 2 and peers[0] == peers[1]  # TP / CP peers: identical samples
    assert by_dp[0] != by_dp[1]
    assert {r["bad"] for r in results} == {sum(r["tp_rank"] + 1 for r in results)}


def test_bucket_ids_match_numpy_unique() -> None:
    from megatron_video.data.sampler import _bucket_ids

    rng = np.random.default_rng(0)
    keys = encode_key(rng.choice([1, 9, 17, 121, 65535], 5000), rng.choice([16, 144, 65535], 5000),
                      rng.choice([0, 32, 256, 1024], 5000))
    uniq, inv = _bucket_ids(keys)
    ref_u, ref_inv = np.unique(keys, return_inverse=True)
    np.testing.assert_array_equal(uniq, ref_u)
    np.testing.assert_array_equal(inv, ref_inv)
    with pytest.raises(ValueError, match="65536"):
        _bucket_ids(np.array([1 << 48], np.int64))


class _KeyDataset:
    """Cheap stand-in dataset: returns only ids and shapes (resolves tagged items like the real ones)."""

    def __init__(self, keys: np.ndarray) -> None:
        self.keys = keys

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, item: tuple[int, int, int]) -> dict:
        from megatron_video.data.dataset import SampleIndex
        from megatron_video.data.shapes import decode_key

        sid, _ = SampleIndex.split(item, 0)
        return {"sample_id": sid, "requested_id": sid, "shape": decode_key(self.keys[sid]),
                "position": SampleIndex.position(item)}


def test_resume_through_prefetching_loader_with_skips() -> None:
    from megatron_video.data.loader import build_dataloader

    keys = uneven_keys(400, seed=3)
    ref_sampler = ShapeBatchSampler(keys, 8, 2, 1, 2, seed=2)
    skip = {int(ref_sampler.epoch_batches(0)[2, 0])}
    ref_sampler.add_skip_ids(skip)
    ref = [mb for mb in ref_sampler]
    sampler = ShapeBatchSampler(keys, 8, 2, 1, 2, seed=2, skip_ids=skip)
    loader = build_dataloader(_KeyDataset(keys), sampler, num_workers=2, prefetch_factor=4)
    trained, last = [], None
    for batch in loader:  # the workers run ahead; stop "training" after 7 micro-batches
        trained.append(batch["sample_id"].tolist())
        last = batch["sampler_position"]
        if len(trained) == 7:
            break
    assert sampler.consumed_samples > last[1]  # the sampler itself is ahead of training
    state = sampler.state_dict(position=last)
    resumed = ShapeBatchSampler(keys, 8, 2, 1, 2, seed=2)
    resumed.load_state_dict(state)
    assert resumed.skip_ids == skip
    rest = [b["sample_id"].tolist() for b in build_dataloader(_KeyDataset(keys), resumed, num_workers=0)]
    assert trained + rest == ref


def _train(sampler: ShapeBatchSampler, steps: int, extreme_steps: set[int], recorded: list,
           done: int = 0) -> tuple[list[list[int]], tuple[int, int]]:
    """What the training loop does with the sampler: pull one global batch per step (dp 1), record the ids of
    extreme steps for the epoch after theirs (loop.py `_record_extreme`). Returns the ids per step and the
    resume position after the last one."""
    stream = (tagged for _ in iter(int, 1) for tagged in sampler.iter_tagged())
    out, position = [], (0, 0)
    for step in range(done + 1, done + steps + 1):
        pulled = [next(stream) for _ in range(sampler.micro_batches_per_global)]
        ids = [i for _, micro, _ in pulled for i in micro]
        position = (pulled[-1][0], pulled[-1][2])
        out.append(ids)
        if step in extreme_steps:
            recorded.append((position[0], ids))
            sampler.add_skip_ids(ids, from_epoch=position[0] + 1)
    return out, position


@pytest.mark.parametrize("stop", [4, 12, 19], ids=["same-epoch", "epoch-end", "next-epoch"])
def test_resume_after_extreme_step_sees_the_same_samples(stop: int) -> None:
    """Issue 20 item 8: an extreme batch's ids used to reach the sampler only at the next start, so a resumed
    run skipped later batches the uninterrupted run trained on. Sample ids per step must match."""
    keys = np.full(50, encode_key(9, 32, 32), np.int64)  # 12 global batches of 4 per epoch
    total, extreme = 40, {3, 16}
    full_sampler, full_rec = ShapeBatchSampler(keys, 4, 2, seed=7), []
    full, _ = _train(full_sampler, total, extreme, full_rec)
    assert full_sampler.skipped_batches >= 2  # the recorded samples come back and their batches are skipped
    assert not set(full[2]) & {i for ids in full[12:] for i in ids}  # ... from the next epoch on

    first_sampler, recorded = ShapeBatchSampler(keys, 4, 2, seed=7), []
    head, position = _train(first_sampler, stop, extreme, recorded)
    state = first_sampler.state_dict(position=position)
    resumed = ShapeBatchSampler(keys, 4, 2, seed=7)
    resumed.load_state_dict(state)
    for epoch, ids in recorded:  # from the checkpointed extreme log, as loop.py does at start
        resumed.add_skip_ids(ids, from_epoch=epoch + 1)
    tail, _ = _train(resumed, total - stop, extreme, recorded, done=stop)
    assert head + tail == full


def test_an_epoch_with_nothing_to_train_is_an_error() -> None:
    """Issue 20 item 9: skip ids covering every sample made the loader yield nothing, forever."""
    keys = np.full(20, encode_key(9, 32, 32), np.int64)
    s = ShapeBatchSampler(keys, 4, 1, seed=0, skip_ids=range(19))
    with pytest.raises(EmptyEpochError, match="epoch 0 has no global batch to train on: each of its 5"):
        next(iter(s))
    # a resumed partial epoch whose rest is skipped is not an error: the next epoch trains again
    t = ShapeBatchSampler(keys, 4, 1, seed=0)
    last = t.epoch_batches(0)[-1].tolist()
    t.load_state_dict({**t.state_dict(), "consumed_samples": 16})
    t.add_skip_ids(last)
    assert list(t) == [] and t.epoch == 1 and len(list(t)) > 0


class _CountingMembers:
    """Row ids grouped by bucket that count how many are read (a stand-in for the memory-mapped index)."""

    def __init__(self, members: np.ndarray) -> None:
        self.members, self.read = members, 0

    def __getitem__(self, idx: np.ndarray) -> np.ndarray:
        self.read += np.asarray(idx).size
        return self.members[idx]


def test_order_is_computed_per_global_batch_without_per_sample_arrays() -> None:
    """Issue 21 item 2: the first micro-batch of a resumed position reads one global batch's members, not the
    data set; the order equals the in-memory one."""
    from megatron_video.data.sampler import BucketMembers

    keys = uneven_keys(3000, seed=4)
    ref = BucketMembers.from_keys(keys)
    counting = _CountingMembers(ref.members)
    lazy = ShapeBatchSampler(BucketMembers(ref.bucket_keys, ref.bucket_sizes, counting, ref.num_rows, ref.digest),
                             16, 2, 1, 2, seed=6)
    eager = ShapeBatchSampler(keys, 16, 2, 1, 2, seed=6)
    state = {**eager.state_dict(), "consumed_samples": 16 * 40}
    lazy.load_state_dict(state)
    eager.load_state_dict(state)
    assert next(iter(lazy)) == next(iter(eager))
    assert counting.read == 16  # one global batch
    assert not any(isinstance(v, np.ndarray) and v.size >= len(keys) // 2 for k, v in vars(lazy).items()
                   if k != "_members")
