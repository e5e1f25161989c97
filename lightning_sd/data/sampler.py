"""A seeded, rank-sharded, resumable sampler for the train loader."""

from __future__ import annotations

import math
import random
from collections.abc import Iterator

from torch.utils.data import DistributedSampler


class ResumableSampler(DistributedSampler):
    """Indices of `n` records in an order fixed by `(seed, epoch)`, split across ranks like
    `DistributedSampler` (every rank gets `ceil(n / num_replicas)` indices, wrapping around).

    `resume(epoch, batches_done)` makes the next pass over that epoch skip its first `batches_done` batches
    of `batch_size`, so a resumed run sees exactly the batches an uninterrupted run would have seen.
    It subclasses `DistributedSampler` only so that Lightning keeps it under DDP instead of replacing it;
    it shards by rank itself and never needs a process group.
    """

    def __init__(self, n: int, *, batch_size: int, seed: int = 0, shuffle: bool = True, num_replicas: int = 1,
                 rank: int = 0) -> None:  # no super().__init__(): it would look for a process group
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank={rank} must be in [0, {num_replicas})")
        self.n, self.batch_size, self.seed, self.shuffle = n, batch_size, seed, shuffle
        self.num_replicas, self.rank, self.drop_last = num_replicas, rank, False
        self.num_samples = math.ceil(n / num_replicas)
        self.total_size = self.num_samples * num_replicas
        self.epoch = 0
        self.yielded = 0  # indices handed out in the current epoch (skipped ones included)
        self._resume: tuple[int, int] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume(self, epoch: int, batches_done: int) -> None:
        self._resume = (epoch, batches_done)

    def indices(self, epoch: int) -> list[int]:
        """This rank's indices for `epoch`, before any skipping."""
        order = list(range(self.n))
        if self.shuffle:
            random.Random(f"{self.seed}/{epoch}").shuffle(order)
        order += order[: self.total_size - self.n]
        return order[self.rank:self.total_size:self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        skip = 0
        if self._resume is not None and self._resume[0] == self.epoch:
            skip = min(self._resume[1] * self.batch_size, self.num_samples)
        self._resume = None
        self.yielded = skip
        for i in self.indices(self.epoch)[skip:]:
            self.yielded += 1
            yield i

    def __len__(self) -> int:
        # the full epoch, also after a resume: Lightning counts the skipped batches as already done
        return self.num_samples

    @property
    def batches_yielded(self) -> int:
        return math.ceil(self.yielded / self.batch_size)
