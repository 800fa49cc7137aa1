"""The order of the sample stream: canonical streams over the shards, shuffled within windows, O(shards) state.

Each epoch the shards are put in an order drawn from (seed, epoch) and their samples laid end to end; that sequence
is cut into ``streams`` equal spans (the canonical streams, fixed for the life of a run, as MosaicML Streaming's
canonical nodes), the remainder of the division dropped. A stream reads its span in order, window by window
(``window`` samples: consecutive shards), and shuffles the samples within each window by a keyed bijection (a
Feistel network with cycle walking) drawn from (seed, epoch, stream, window). Global position ``q`` of the epoch
belongs to stream ``q % streams`` as its ``q // streams``-th sample: the streams are interleaved.

Nothing here depends on the number of ranks or workers, nothing is kept per sample, and any position maps to its
sample in O(log shards): resuming at a position reads only what comes after it. With one stream and one window
holding every sample the order is a uniform-looking permutation of the whole data, as a global shuffle; with a
window of a few shards each stream touches a few shards at a time, which is what reading from object storage
through a local cache needs.
"""

from __future__ import annotations

import numpy as np

from ssltrain.data.shards import DataError

_M64 = 0xFFFFFFFFFFFFFFFF
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_ROUNDS = 8


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 arrays (wrapping arithmetic): a fixed, well-mixed hash."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def mix_int(x: int) -> int:
    """:func:`mix64` on one Python integer: the same value, without numpy's per-call overhead."""
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def mix_scalar(*parts: int) -> int:
    """One 64-bit hash of several integers (order matters)."""
    z = 0
    for part in parts:
        z = mix_int((z * 0x9E3779B97F4A7C15 + part + 1) & _M64)
    return z


def hash_order(n: int, key: int) -> np.ndarray:
    """A permutation of ``range(n)``: indices sorted by a keyed hash. Pure integer arithmetic, the same on every
    numpy version and machine."""
    with np.errstate(over="ignore"):
        keys = mix64(np.arange(n, dtype=np.uint64) * _GOLDEN + np.uint64(key & _M64))
    return np.argsort(keys, kind="stable")


def permute(j: np.ndarray, size: np.ndarray, key: np.ndarray) -> np.ndarray:
    """Element-wise bijections: ``j[i]`` in ``[0, size[i])`` to its image under the permutation keyed by ``key[i]``.

    A balanced Feistel network on the smallest even bit width holding ``size`` (at most 4x ``size`` values), cycle
    walking until the value falls inside ``[0, size)``: O(1) state for a permutation of any size.
    """
    j, size, key = (np.asarray(a, dtype=np.uint64) for a in (j, size, key))
    bits = np.maximum(np.ceil(np.log2(np.maximum(size, 2).astype(np.float64))), 2).astype(np.uint64)
    half = (bits + (bits & np.uint64(1))) // np.uint64(2)
    mask = (np.uint64(1) << half) - np.uint64(1)
    out = j.copy()
    todo = np.ones(out.shape, dtype=bool)
    while todo.any():
        x, h, m, k = out[todo], half[todo], mask[todo], key[todo]
        left, right = x >> h, x & m
        with np.errstate(over="ignore"):
            for r in range(_ROUNDS):
                f = mix64(k ^ (right * _GOLDEN) ^ np.uint64((r + 1) * 0xD1B54A32D192ED03 & _M64)) & m
                left, right = right, left ^ f
        out[todo] = (left << h) | right
        todo = out >= size
    return out


class StreamOrder:
    """Which sample (an id of the catalog) comes at each position of an epoch; see the module docstring.

    ``shard_counts[i]`` is shard ``i``'s sample count; sample ids run over the shards in path order, as the catalog
    numbers them. Fewer samples than ``streams`` make one stream a sample. ``window`` 0 means one window per stream
    (the stream's whole span). ``shuffle`` False keeps the shards in path order and every window unshuffled.
    """

    def __init__(self, shard_counts: np.ndarray, streams: int, window: int, seed: int, shuffle: bool = True) -> None:
        counts = np.asarray(shard_counts, dtype=np.int64)
        total = int(counts.sum())
        if streams < 1:
            raise DataError(f"data.streams must be >= 1, got {streams}")
        if window < 0:
            raise DataError(f"data.shuffle_window must be >= 0 (0: a stream's whole span), got {window}")
        if total < 1:
            raise DataError("the data holds no samples")
        streams = min(streams, total)  # a data set smaller than the stream count: a stream a sample
        self.counts, self.streams, self.seed, self.shuffle = counts, streams, seed, shuffle
        self.first_id = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        self.span = total // streams  # samples per stream per epoch
        self.window = window if 0 < window < self.span else self.span
        self.samples = self.span * streams  # an epoch's positions
        self._layout: tuple[int, np.ndarray, np.ndarray] | None = None

    def _epoch_layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """The epoch's shard order and where each of those shards starts in the laid-out sequence."""
        if self._layout is None or self._layout[0] != epoch:
            n = len(self.counts)
            order = hash_order(n, mix_scalar(self.seed, epoch, 0x73686172)) if self.shuffle else np.arange(n)
            starts = np.concatenate([[0], np.cumsum(self.counts[order])[:-1]]).astype(np.int64)
            self._layout = (epoch, order, starts)
        return self._layout[1], self._layout[2]

    def sample_ids(self, epoch: int, positions: np.ndarray) -> np.ndarray:
        """The sample ids at ``positions`` (in ``[0, self.samples)``) of ``epoch``."""
        q = np.asarray(positions, dtype=np.int64)
        if q.size and (q.min() < 0 or q.max() >= self.samples):
            raise ValueError(f"positions must lie in [0, {self.samples}) of an epoch")
        stream, k = q % self.streams, q // self.streams
        win, j = k // self.window, k % self.window
        if self.shuffle:
            size = np.minimum(self.window, self.span - win * self.window)
            base = np.uint64(mix_scalar(self.seed, epoch, 0x77696E64))
            with np.errstate(over="ignore"):
                key = mix64(base ^ (stream.astype(np.uint64) * _GOLDEN) ^ mix64(win.astype(np.uint64) + _GOLDEN))
            j = permute(j, size, key).astype(np.int64)
        laid_out = stream * self.span + win * self.window + j
        order, starts = self._epoch_layout(epoch)
        slot = np.searchsorted(starts, laid_out, side="right") - 1
        return self.first_id[order[slot]] + (laid_out - starts[slot])


__all__ = ["StreamOrder", "hash_order", "mix64", "mix_scalar", "permute"]
