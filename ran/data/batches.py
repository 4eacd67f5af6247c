"""What loader workers hand to the training loop: :class:`Batch`, the :class:`Loader` a rank
iterates, and the skipped-sample accounting (:class:`Health`) both decode paths share.

The CPU path (:mod:`ran.data.read`) and the device path (:mod:`ran.data.gpu`) build on this module;
neither imports the other's internals.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Iterator, NamedTuple

import torch
from torch.utils.data import DataLoader, get_worker_info

from ran.data import DataError

log = logging.getLogger("ran.data")

MIN_SAMPLES_FOR_BAD_CHECK = 1000  # judge max_bad_fraction only after this many samples (or at
# the end of an evaluation pass): over fewer, one unlucky bad sample would look like a high rate
MAX_SAMPLE_WARNINGS = 5  # per worker; later bad samples are only counted


class Batch(NamedTuple):
    images: torch.Tensor  # uint8, (N, 3, H, W); normalise on the device with transforms.normalizer
    labels: torch.Tensor  # int64, (N,)
    skipped: int  # samples dropped since the previous batch of this loader worker


class Health:
    """Skipped-sample accounting of one reader (a loader worker, or a rank's device decoder) and
    the ``max_bad_fraction`` check; ``where`` names the reader in messages."""

    def __init__(self, where: str, max_bad_fraction: float):
        self.where, self.max_bad_fraction = where, max_bad_fraction
        self.seen = self.bad = self.pending = self.warnings = 0
        self.last_reason = ""

    def good(self) -> None:
        self.seen += 1

    def skip(self, count: int, reason: str, warn: bool = False) -> None:
        """``count`` samples lost for ``reason``: logged (the first few, or every one if ``warn``),
        reported with the next batch, and checked against ``max_bad_fraction``."""
        self.seen += count
        self.bad += count
        self.pending += count
        self.last_reason = reason
        if warn or self.warnings < MAX_SAMPLE_WARNINGS:
            self.warnings += not warn
            log.warning("%s: skipped %d sample(s): %s", self.where, count, reason)
        if self.seen >= MIN_SAMPLES_FOR_BAD_CHECK:
            self.check()

    def tally(self, good: int, bad: int) -> None:
        """Samples judged (and logged) elsewhere: ``good`` read and ``bad`` skipped; checked
        against ``max_bad_fraction`` once ``MIN_SAMPLES_FOR_BAD_CHECK`` have been seen."""
        self.seen += good + bad
        self.bad += bad
        if self.seen >= MIN_SAMPLES_FOR_BAD_CHECK:
            self.check()

    def take_pending(self) -> int:
        pending, self.pending = self.pending, 0
        return pending

    def check(self) -> None:
        """DataError when more than ``max_bad_fraction`` of the samples seen were bad."""
        if self.bad and self.bad > self.max_bad_fraction * self.seen:
            last = f" (last: {self.last_reason})" if self.last_reason else ""
            raise DataError(f"{self.bad} of {self.seen} samples unreadable in {self.where}, above "
                            f"max_bad_fraction={self.max_bad_fraction}{last}")


def batch_tensor(shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """An uninitialised uint8 tensor of ``shape``; in a loader worker, allocated in shared memory
    right away (as torch's default_collate does) so sending it to the main process copies nothing."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=torch.uint8)
    storage = torch.UntypedStorage._new_shared(math.prod(shape))
    return torch.empty(0, dtype=torch.uint8).set_(storage).view(shape)


class Loader:
    """Iterable of :class:`Batch` for one rank; ``len()`` batches per epoch, ``set_epoch`` reshuffles.

    ``dataset`` is the :class:`ran.data.read.ShardDataset` the ``dataloader``'s workers iterate.
    """

    def __init__(self, dataset: Any, dataloader: DataLoader, num_batches: int,
                 num_samples: int, manifest: dict[str, Any]):
        self.dataset, self.dataloader = dataset, dataloader
        self.num_batches, self.num_samples, self.manifest = num_batches, num_samples, manifest

    @property
    def classes(self) -> list[str]:
        return list(self.manifest["classes"])

    @property
    def num_classes(self) -> int:
        return int(self.manifest["num_classes"])

    def __len__(self) -> int:
        return self.num_batches

    def set_epoch(self, epoch: int) -> None:
        """Pick the epoch's shuffle (and crops); call before iterating."""
        self.dataset.epoch[0] = epoch

    def __iter__(self) -> Iterator[Any]:
        iterator = iter(self.dataloader)
        while True:
            message = None
            try:
                batch = next(iterator)
            except StopIteration:
                return
            except DataError as exc:  # from a worker: keep the one-line message, drop the traceback
                message = _worker_message(str(exc))
            if message is not None:
                # Stop the workers now: torch's re-raised exception sits in a reference cycle that
                # keeps the DataLoader iterator alive until a garbage collection, which may close
                # its queues before the iterator, and then each worker takes 5 s to time out.
                del iterator
                self.close()
                raise DataError(message)
            yield batch

    def close(self) -> None:
        """Stop the persistent loader workers now (they also stop when the loader is dropped)."""
        iterator = getattr(self.dataloader, "_iterator", None)  # DataLoader's persistent iterator
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
        self.dataloader._iterator = None


def _worker_message(text: str) -> str:
    prefix = "ran.data.DataError: "
    lines = [line for line in text.strip().splitlines() if line.startswith(prefix)]
    return lines[-1][len(prefix):] if lines else text.strip().splitlines()[-1]
