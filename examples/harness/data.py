"""The training data stream: a pure function of ``(seed, epoch, sample)``.

The order of an epoch comes from ``(seed, epoch)`` (:class:`EpochSampler`, sharded over
ranks) and each training sample's random augmentation runs under torch's RNG seeded by
``(seed, epoch, index)``, then restored (:class:`SeededItems`), whatever process or
DataLoader worker loads it. A resumed run therefore skips the steps already taken without
loading them (:mod:`.checkpoint`), and results do not depend on ``--workers``.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Dataset, DistributedSampler, Sampler

from .distributed import Dist


def mix_seed(*parts: int | str) -> int:
    """A 63-bit seed from several integers (seed, epoch, index, ...): unrelated streams for
    neighbouring tuples, the same in every process."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class SeededItems(Dataset):
    """``dataset[index]`` loaded under torch's RNG seeded by ``(seed, epoch, index)`` and restored after.

    A sample's random augmentation (RandomCrop, flips: torchvision draws from torch's
    RNG) thus depends on nothing else: not on the DataLoader worker that loads it, nor on
    what was drawn before it, nor on the process's own RNG, which stays untouched. That
    is what lets a resumed run skip the steps already taken without loading them, and
    makes results independent of ``--workers``. Keys come from :class:`EpochSampler`.
    """

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        # the CPU generator only (torch.manual_seed would also reseed every CUDA device,
        # 40x slower): a few microseconds a sample
        gen = torch.default_generator
        saved = gen.get_state()
        gen.manual_seed(mix_seed("augment", self.seed, epoch, index))
        try:
            return self.dataset[index]
        finally:
            gen.set_state(saved)


class EpochSampler(Sampler):
    """This rank's shard of the epoch's permutation (``DistributedSampler``, seeded by
    ``(seed, epoch)``, drop_last) as ``(epoch, index)`` keys for :class:`SeededItems`,
    optionally without its first ``skip`` samples (a run resumed mid-epoch)."""

    def __init__(self, dataset: Dataset, d: Dist, seed: int):
        self.inner = DistributedSampler(dataset, num_replicas=d.world, rank=d.rank, shuffle=True, seed=seed, drop_last=True)  # fmt: skip
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.inner.set_epoch(epoch)
        self.epoch, self.skip = epoch, skip

    def __len__(self) -> int:
        return max(0, len(self.inner) - self.skip)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return ((self.epoch, i) for i in itertools.islice(iter(self.inner), self.skip, None))
