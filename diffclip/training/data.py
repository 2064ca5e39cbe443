"""CSV training data (image path, caption), read as one stream of samples shared by every rank and worker.

The stream is the concatenation of per-epoch permutations of the rows (epoch e: a permutation seeded by
(seed, e)). Optimizer step s consumes the G = world · batch · accum positions after the previous step's; inside
them, micro-batch j of rank r holds b consecutive positions. So within an epoch every row is used exactly once
across all ranks and workers (none dropped, none repeated): the last step of an epoch completes its batch with
the first rows of the next epoch's permutation. The data position in a checkpoint is one integer (samples
consumed), and a resume continues the stream there, with any number of workers. Each batch is decoded by one
DataLoader worker; the loader returns batches in order.
"""

from __future__ import annotations

import csv
import os

import torch

from .samples import Preprocess, SampleError, collate


class DataError(ValueError):
    """Training data that cannot be used at all (missing file, missing columns, no rows)."""


def read_csv(path: str, image_key: str, caption_key: str, separator: str) -> list[tuple[str, str]]:
    """[(image path, caption)], image paths relative to the CSV's folder unless absolute. Empty captions are
    kept here: they are skipped (and counted) like corrupt images when their turn comes."""
    if not os.path.isfile(path):
        raise DataError(f"training CSV not found: {path}")
    base = os.path.dirname(os.path.abspath(path))
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter=separator)
        fields = reader.fieldnames or []
        missing = [k for k in (image_key, caption_key) if k not in fields]
        if missing:
            raise DataError(f"{path} has no column {', '.join(repr(k) for k in missing)} (columns: {fields}; "
                            f"set --csv-image-key / --csv-caption-key / --csv-separator)")
        rows = [(os.path.join(base, r[image_key] or ""), r[caption_key]) for r in reader]
    if not rows:
        raise DataError(f"{path} has a header but no rows")
    return rows


def permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g)


class StreamSampler:
    """Yields, for each optimizer step from `start_step` to `total_steps`, this rank's `accum` micro-batches as
    tuples of stream positions. `start_position` is the stream position of `start_step`'s first sample."""

    def __init__(self, rank, world, batch_size, accum, start_step, total_steps, start_position):
        self.rank, self.world, self.b, self.accum = rank, world, batch_size, accum
        self.start_step, self.total, self.start_position = start_step, total_steps, start_position

    def __iter__(self):
        per_micro = self.world * self.b
        for s in range(self.total - self.start_step):
            base = self.start_position + s * per_micro * self.accum
            for j in range(self.accum):
                first = base + j * per_micro + self.rank * self.b
                yield tuple(range(first, first + self.b))

    def __len__(self):
        return (self.total - self.start_step) * self.accum


class CsvStream(torch.utils.data.Dataset):
    """dataset[positions] -> one decoded batch (DataLoader with batch_size=None and a StreamSampler)."""

    def __init__(self, rows, preprocess: Preprocess, seed: int, strict: bool):
        self.rows, self.preprocess, self.seed, self.strict = rows, preprocess, seed, strict
        self._perms: dict[int, torch.Tensor] = {}

    def row_index(self, position: int) -> int:
        epoch, offset = divmod(position, len(self.rows))
        if epoch not in self._perms:
            if len(self._perms) >= 2:  # a batch spans at most two epochs
                self._perms.pop(min(self._perms))
            self._perms[epoch] = permutation(len(self.rows), self.seed, epoch)
        return int(self._perms[epoch][offset])

    def __getitem__(self, positions):
        good, errors = [], []
        for pos in positions:
            i = self.row_index(pos)
            path, caption = self.rows[i]
            try:
                good.append(self.preprocess(path, caption, pos))
            except SampleError as e:
                errors.append(f"row {i + 2} ({path}): {e}")  # +2: 1-based, after the header line
                if self.strict:
                    break  # the training process raises (a clean one-line error instead of a worker traceback)
        return collate(good, errors, {"last_position": positions[-1]})

    def __len__(self):  # the stream is unbounded; this is the row count
        return len(self.rows)


def csv_loader(rows, preprocess, *, rank, world, batch_size, accum, start_step, total_steps, start_position,
               workers, seed, strict):
    sampler = StreamSampler(rank, world, batch_size, accum, start_step, total_steps, start_position)
    return torch.utils.data.DataLoader(
        CsvStream(rows, preprocess, seed, strict), batch_size=None, sampler=sampler, num_workers=workers,
        persistent_workers=False, prefetch_factor=2 if workers else None)


class CsvPosition:
    """Data position of a CSV run: the stream position (samples consumed by all ranks) after each step."""

    def __init__(self, start_position: int, global_batch: int, accum: int):
        self.start, self.global_batch, self.accum, self.micro = start_position, global_batch, accum, 0

    def on_batch(self, batch) -> None:
        self.micro += 1

    def samples_seen(self) -> int:
        return self.start + (self.micro // self.accum) * self.global_batch

    def checkpoint_data(self) -> dict:
        return {"kind": "csv"}
