"""Shape-safe, seeded, resumable distributed batch sampler.

Every global batch is drawn from one shape bucket, so all data-parallel ranks (and all micro-batches of the
step) see one T x H x W. The epoch order is a pure function of (keys, seed, epoch, batch settings), computed
on demand per global batch from keyed Feistel permutations (of the epoch's batches, and of each bucket's
members), so no per-sample array is built per epoch. Each rank computes the same global batch and takes its
slice, and model-parallel peers (TP/CP/PP ranks of one replica) pass the same dp rank and get identical
samples. The position is counted in global consumed samples, so resume continues at the exact next sample,
also with a different data-parallel size.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from megatron_video.data.permutation import FeistelPermutation, derive_key
from megatron_video.data.shapes import decode_key

logger = logging.getLogger(__name__)


@dataclass
class BucketMembers:
    """Which rows form each shape bucket: `members[bucket_starts[b]:bucket_starts[b] + bucket_sizes[b]]` are
    the row ids of bucket b (ascending keys). `members` may be a memory map (see `bucket_index`), so ranks on
    a node share one copy in the page cache; `digest` identifies the planned keys for resume checks."""

    bucket_keys: np.ndarray  # int64, sorted
    bucket_sizes: np.ndarray  # int64
    members: np.ndarray  # integer row ids, grouped by bucket
    num_rows: int
    digest: str

    def __getstate__(self) -> dict[str, Any]:
        """A memory-mapped `members` pickles as its file (a spawned DataLoader worker maps it, no copy)."""
        state = dict(self.__dict__)
        m = self.members
        # only a whole-file map (as np.load gives for .npy) pickles by path: a slice keeps its parent's offset
        if isinstance(m, np.memmap) and m.filename is not None and m.offset + m.nbytes == os.path.getsize(m.filename):
            state["members"] = ("memmap", m.filename, m.dtype.str, m.shape, m.offset)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        m = state["members"]
        if isinstance(m, tuple) and m[0] == "memmap":
            state["members"] = np.memmap(m[1], np.dtype(m[2]), "r", m[4], m[3])
        self.__dict__.update(state)

    @property
    def bucket_starts(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.bucket_sizes)[:-1]]).astype(np.int64)

    @classmethod
    def from_keys(cls, keys: np.ndarray) -> BucketMembers:
        keys = np.asarray(keys)
        if keys.ndim != 1 or not np.issubdtype(keys.dtype, np.integer):
            raise ValueError("keys must be a 1-D integer array of shape keys (-1 = excluded)")
        digest = hashlib.blake2b(np.ascontiguousarray(keys, np.int64), digest_size=16).hexdigest()
        valid = np.flatnonzero(keys >= 0)
        uniq, inverse = _bucket_ids(keys[valid])
        counts = np.bincount(inverse, minlength=len(uniq)).astype(np.int64)
        # group row ids by bucket once (a stable radix sort for small integer bucket ids)
        members = valid[np.argsort(inverse, kind="stable")]
        if len(keys) < 2**31:
            members = members.astype(np.int32)
        return cls(uniq, counts, members, len(keys), digest)


class EmptyEpochError(RuntimeError):
    """A whole epoch has no global batch left to train on (every one holds a skip-listed sample id)."""


class ShapeBatchSampler:
    """Yields, per micro-batch, the list of sample indices of this data-parallel rank.

    Args:
        keys: int64 shape key per sample (`shapes.encode_key`), -1 for samples excluded from training; or
            the bucket membership itself (`BucketMembers`, e.g. memory-mapped from a planned bucket index).
        global_batch_size: samples per optimizer step over all DP ranks.
        micro_batch_size: samples per rank per forward pass.
        dp_rank, dp_size: this replica's data-parallel coordinates.
        seed: base seed; the order of epoch e depends on (seed, e) only.
        min_bucket_batches: buckets with fewer than this many global batches are dropped (logged); with
            drop_last=False every non-empty bucket is kept.
        drop_last: drop each bucket's incomplete last global batch (True) or complete it by repeating
            bucket members (False: a held-out set smaller than a global batch is still evaluated).
        skip_ids: sample ids whose whole global batch is skipped (the same on every rank, so shapes and
            positions stay aligned); skipped batches still count as consumed.
    """

    def __init__(self, keys: np.ndarray | BucketMembers, global_batch_size: int, micro_batch_size: int,
                 dp_rank: int = 0, dp_size: int = 1, seed: int = 0, min_bucket_batches: int = 1, drop_last: bool = True,
                 skip_ids: Iterable[int] | None = None) -> None:
        if micro_batch_size < 1 or dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"invalid micro_batch_size={micro_batch_size} dp_rank={dp_rank} "
                             f"dp_size={dp_size}")
        if global_batch_size % (micro_batch_size * dp_size) != 0 or global_batch_size < 1:
            raise ValueError(f"global_batch_size={global_batch_size} must be a multiple of micro_batch_size "
                             f"* dp_size = {micro_batch_size * dp_size}")
        if min_bucket_batches < 1:
            raise ValueError("min_bucket_batches must be >= 1")
        self.global_batch_size, self.micro_batch_size = global_batch_size, micro_batch_size
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, seed
        self.min_bucket_batches, self.drop_last = min_bucket_batches, drop_last
        members = keys if isinstance(keys, BucketMembers) else BucketMembers.from_keys(keys)
        self.num_samples, self._digest = members.num_rows, members.digest
        keep = members.bucket_sizes >= (min_bucket_batches * global_batch_size if drop_last else 1)
        self._log_dropped(members.bucket_keys[~keep], members.bucket_sizes[~keep])
        if not keep.any():
            raise ValueError(f"no shape bucket has >= {min_bucket_batches} global batch(es) of "
                             f"{global_batch_size} samples; buckets: "
                             f"{self._describe(members.bucket_keys, members.bucket_sizes)}")
        self._members = members.members  # row ids grouped by bucket (in memory, or memory-mapped)
        self.bucket_keys, self.bucket_sizes = members.bucket_keys[keep], members.bucket_sizes[keep]
        self._bucket_start = members.bucket_starts[keep]
        g = global_batch_size
        per_bucket = self.bucket_sizes // g if drop_last else -(-self.bucket_sizes // g)
        self._bucket_batches = per_bucket
        self._batch_start = np.concatenate([[0], np.cumsum(per_bucket)]).astype(np.int64)
        self.num_batches = int(self._batch_start[-1])
        self.samples_per_epoch = self.num_batches * g
        logger.info("sampler: %d samples in %d shape bucket(s), %d global batches of %d per epoch (%s %d "
                    "samples per epoch to fill whole batches)", int(self.bucket_sizes.sum()), int(keep.sum()),
                    self.num_batches, g, "leaving out" if drop_last else "repeating",
                    abs(int(self.bucket_sizes.sum()) - self.samples_per_epoch))
        self.skip_ids: set[int] = set(int(i) for i in skip_ids) if skip_ids else set()
        self._pending_skips: list[tuple[int, set[int]]] = []  # (first epoch, ids): see add_skip_ids
        self.epoch, self.consumed_samples = 0, 0
        self.skipped_batches = 0
        self._perms: tuple[int, FeistelPermutation, dict[int, FeistelPermutation]] | None = None
        self._batch: tuple[int, int, np.ndarray] | None = None

    # ---------------------------------------------------------------- order
    def _epoch_perms(self, epoch: int) -> tuple[FeistelPermutation, dict[int, FeistelPermutation]]:
        if self._perms is None or self._perms[0] != epoch:
            self._perms = (epoch, FeistelPermutation(self.num_batches, derive_key(self.seed, epoch, -1)), {})
        return self._perms[1], self._perms[2]

    def global_batch(self, epoch: int, b: int) -> np.ndarray:
        """The sample ids of global batch `b` of `epoch`, computed on demand, identical on every rank.

        Batch slot b maps through a keyed permutation of all the epoch's batches to (bucket, batch k of the
        bucket); sample j = k * gbs + i of the bucket is member perm_bucket(j) of it (j wrapped past the bucket
        size when drop_last=False completes the last batch with other members)."""
        if self._batch is not None and self._batch[:2] == (epoch, b):
            return self._batch[2]
        batch_perm, bucket_perms = self._epoch_perms(epoch)
        q = batch_perm.at(b)
        bucket = int(np.searchsorted(self._batch_start, q, side="right")) - 1
        size, key = int(self.bucket_sizes[bucket]), int(self.bucket_keys[bucket])
        perm = bucket_perms.get(bucket)
        if perm is None:
            perm = bucket_perms[bucket] = FeistelPermutation(size, derive_key(self.seed, epoch, key))
        j = (q - int(self._batch_start[bucket])) * self.global_batch_size + np.arange(self.global_batch_size)
        j = j % size
        ids = np.asarray(self._members[int(self._bucket_start[bucket]) + perm(j)], np.int64)
        self._batch = (epoch, b, ids)  # the micro-batches of one global batch reuse it
        return ids

    def epoch_batches(self, epoch: int) -> np.ndarray:
        """(num_global_batches, global_batch_size) sample ids of `epoch`, materialised (tests, small sets)."""
        return np.stack([self.global_batch(epoch, b) for b in range(self.num_batches)])

    # ---------------------------------------------------------------- iteration
    @property
    def micro_batches_per_global(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.dp_size)

    def __len__(self) -> int:
        """Micro-batches this rank still yields in the current epoch (skipped batches included)."""
        return (self.samples_per_epoch - self.consumed_samples) // (self.micro_batch_size * self.dp_size)

    def __iter__(self) -> Iterator[list[int]]:
        for _, ids, _ in self.iter_tagged():
            yield ids

    def iter_tagged(self) -> Iterator[tuple[int, list[int], int]]:
        """Like iteration, as (epoch, ids, consumed_samples after this micro-batch). The epoch seeds the
        dataset's per-sample randomness; (epoch, consumed) is the exact resume position after the micro-batch
        (`state_dict(position=...)`), valid however far a DataLoader prefetches and whatever was skipped."""
        epoch = self.epoch
        fresh = self.consumed_samples == 0
        if fresh:
            self._activate_pending_skips(epoch)
        step = self.micro_batch_size * self.dp_size
        skip = np.fromiter(self.skip_ids, np.int64) if self.skip_ids else None
        yielded = False
        while self.consumed_samples < self.samples_per_epoch:
            b, offset = divmod(self.consumed_samples, self.global_batch_size)
            batch = self.global_batch(epoch, b)
            if skip is not None and np.isin(batch, skip).any():
                self.skipped_batches += 1
                logger.info("sampler: skipping global batch %d of epoch %d (holds a skip-listed id)",
                            b, epoch)
                self.consumed_samples = (b + 1) * self.global_batch_size
                continue
            lo = offset + self.dp_rank * self.micro_batch_size
            self.consumed_samples += step  # counted when handed out: a state saved after it resumes past it
            yielded = True
            yield epoch, batch[lo:lo + self.micro_batch_size].tolist(), self.consumed_samples
        if fresh and not yielded:  # every later epoch would be empty too: iterating on would spin forever
            raise EmptyEpochError(
                f"epoch {epoch} has no global batch to train on: each of its {self.num_batches} global batches holds "
                f"one of the {len(self.skip_ids)} skip-listed sample ids (samples of recorded extreme steps)")
        self.epoch, self.consumed_samples = epoch + 1, 0

    def add_skip_ids(self, ids: Iterable[int], from_epoch: int | None = None) -> None:
        """Skip every global batch holding one of `ids`: at once (`from_epoch=None`; an epoch already being
        iterated keeps its list until its end), or from the start of epoch `from_epoch` on. The training
        loop passes the epoch after the one an extreme batch came from: then an uninterrupted run and a run
        resumed anywhere (its current epoch's list restored by `load_state_dict`) skip the same batches."""
        ids = {int(i) for i in ids}
        if from_epoch is None:
            self.skip_ids |= ids
        else:
            self._pending_skips.append((int(from_epoch), ids))

    def _activate_pending_skips(self, epoch: int) -> None:
        due = [ids for first, ids in self._pending_skips if first <= epoch]
        self._pending_skips = [(first, ids) for first, ids in self._pending_skips if first > epoch]
        self.skip_ids.update(*due)

    # ---------------------------------------------------------------- state
    def fingerprint(self) -> dict[str, Any]:
        return {"num_samples": self.num_samples, "keys_digest": self._digest,
                "global_batch_size": self.global_batch_size, "seed": self.seed,
                "min_bucket_batches": self.min_bucket_batches, "drop_last": self.drop_last}

    def state_dict(self, position: tuple[int, int] | None = None, total_consumed_samples: int | None = None
                   ) -> dict[str, Any]:
        """Position + settings fingerprint.

        By default the position is what this sampler has handed out, which is ahead of training when a
        DataLoader prefetches. Pass instead `position`, the (epoch, consumed) tag of the last micro-batch
        trained on (`batch["sampler_position"]` from `build_dataloader`), or `total_consumed_samples` counted
        by the loop over all epochs (exact only when no global batch was skipped).
        """
        epoch, consumed = self.epoch, self.consumed_samples
        if position is not None:
            epoch, consumed = int(position[0]), int(position[1])
        elif total_consumed_samples is not None:
            epoch, consumed = divmod(int(total_consumed_samples), self.samples_per_epoch)
        return {"epoch": epoch, "consumed_samples": consumed, "skip_ids": sorted(self.skip_ids),
                "fingerprint": self.fingerprint()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved, now = state.get("fingerprint", {}), self.fingerprint()
        diff = [f"{k}: saved {saved.get(k)!r} != now {v!r}" for k, v in now.items() if saved.get(k) != v]
        if diff:
            raise ValueError("sampler state does not match this data set / settings: " + "; ".join(diff))
        epoch, consumed = int(state["epoch"]), int(state["consumed_samples"])
        if consumed < 0 or consumed > self.samples_per_epoch:
            raise ValueError(f"sampler state: consumed_samples={consumed} outside "
                             f"[0, {self.samples_per_epoch}]")
        if consumed % (self.micro_batch_size * self.dp_size):
            raise ValueError(f"sampler state: consumed_samples={consumed} is not a multiple of "
                             f"micro_batch_size * dp_size = {self.micro_batch_size * self.dp_size}")
        if consumed == self.samples_per_epoch:
            epoch, consumed = epoch + 1, 0
        self.epoch, self.consumed_samples = epoch, consumed
        self.skip_ids |= set(int(i) for i in state.get("skip_ids", []))

    # ---------------------------------------------------------------- reporting
    def bucket_summary(self) -> dict[tuple[int, int, int], int]:
        return {decode_key(k): int(c) for k, c in zip(self.bucket_keys, self.bucket_sizes)}

    @staticmethod
    def _describe(keys: np.ndarray, counts: np.ndarray, limit: int = 20) -> str:
        order = np.argsort(-counts)[:limit]
        text = ", ".join("{}x{}x{}: {}".format(*decode_key(keys[i]), int(counts[i])) for i in order)
        return text + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")

    def _log_dropped(self, keys: np.ndarray, counts: np.ndarray) -> None:
        self.dropped_small_buckets = {decode_key(k): int(c) for k, c in zip(keys, counts)}
        if len(keys):
            logger.warning("sampler: dropped %d samples in %d small bucket(s) (< %d global batches of %d): "
                           "%s",
                           int(counts.sum()), len(keys), self.min_bucket_batches, self.global_batch_size,
                           self._describe(keys, counts))


def _dense_codes(values: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(distinct values, index of each value among them) for integers in [0, size), by a lookup table."""
    present = np.zeros(size, bool)
    present[values] = True
    lut = (np.cumsum(present) - 1).astype(np.int32)
    return np.flatnonzero(present), lut[values]


def _bucket_ids(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sorted distinct keys, bucket id per key), in O(N).

    Keys pack (T, H, W) in 16-bit fields (`shapes.encode_key`), each taking few values, so T, H and W are
    mapped to dense codes by lookup tables and their combination counted directly (no N log N sort).
    """
    if len(keys) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int16)
    if int(keys.max()) >= 1 << 48:
        raise ValueError("shape keys must pack T, H, W < 65536 (shapes.encode_key)")
    t_vals, code = _dense_codes((keys >> 32).astype(np.int32), 1 << 16)
    h_vals, h_idx = _dense_codes(((keys >> 16) & 0xFFFF).astype(np.int32), 1 << 16)
    code = code.astype(np.int64) * len(h_vals) + h_idx
    del h_idx
    w_vals, w_idx = _dense_codes((keys & 0xFFFF).astype(np.int32), 1 << 16)
    code = code * len(w_vals) + w_idx
    del w_idx
    combos, inverse = _dense_codes(code, len(t_vals) * len(h_vals) * len(w_vals))
    ti, rest = np.divmod(combos, len(h_vals) * len(w_vals))
    hi, wi = np.divmod(rest, len(w_vals))
    uniq = (t_vals[ti].astype(np.int64) << 32) | (h_vals[hi].astype(np.int64) << 16) | w_vals[wi]
    # combos ascend in (t, h, w) order, which is the order of the packed keys: uniq is sorted
    return uniq, inverse.astype(np.int16 if len(uniq) < 2**15 else np.int32)
