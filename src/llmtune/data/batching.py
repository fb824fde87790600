"""Training batches of similar length: little compute spent on padding, order still random and seeded."""

import math

import torch
from torch.utils.data import Sampler


class LengthPoolBatchSampler(Sampler[list[int]]):
    """Each epoch: shuffle all rows, cut them into pools of `pool_batches` batches, sort each pool by length, batch
    it, then shuffle the batches. With pool_batches=1 this is a plain shuffled loader.

    Financial PhraseBank prompts run from ~55 to ~130 tokens; random batches of 8 pad to their longest row, sorted
    pools bring that padding from ~25% of the compute to a few percent.
    """

    def __init__(self, lengths: list[int], batch_size: int, pool_batches: int, seed: int):
        self.lengths, self.batch_size, self.pool = lengths, batch_size, batch_size * max(1, pool_batches)
        self.seed, self.epoch = seed, 0

    @property
    def sampler(self):
        """Lightning sets the epoch on `batch_sampler.sampler` before each epoch; here that is this sampler itself."""
        return self

    def set_epoch(self, epoch: int) -> None:
        """Epoch k's order comes from (seed, k) alone: a resumed run draws it as the uninterrupted run did."""
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        self.epoch += 1
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        batches = []
        for start in range(0, len(order), self.pool):
            pool = sorted(order[start:start + self.pool], key=self.lengths.__getitem__)
            batches += [pool[i:i + self.batch_size] for i in range(0, len(pool), self.batch_size)]
        yield from (batches[i] for i in torch.randperm(len(batches), generator=generator).tolist())

    def __len__(self) -> int:
        full, rest = divmod(len(self.lengths), self.pool)
        return full * math.ceil(self.pool / self.batch_size) + math.ceil(rest / self.batch_size)


class PackedBatchSampler(Sampler[list[tuple[int, ...]]]):
    """Each epoch: shuffle the rows, pack them first-fit-decreasing into sequences of at most pack_length tokens,
    shuffle the packs and yield them batch_size at a time. A pack is a tuple of row indices (see Packs).

    Packing leaves no padding between rows, only at the end of the shorter packs of a batch; a row longer than
    pack_length gets a pack of its own.
    """

    def __init__(self, lengths: list[int], batch_size: int, pack_length: int, seed: int):
        self.lengths, self.batch_size, self.pack_length = lengths, batch_size, pack_length
        self.seed, self.epoch = seed, 0

    @property
    def sampler(self):
        """Lightning sets the epoch on `batch_sampler.sampler` before each epoch; here that is this sampler itself."""
        return self

    def set_epoch(self, epoch: int) -> None:
        """Epoch k's order comes from (seed, k) alone: a resumed run draws it as the uninterrupted run did."""
        self.epoch = epoch

    def packs(self, generator: torch.Generator) -> list[tuple[int, ...]]:
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        packs, room = [], []  # room[i]: tokens still free in packs[i]
        for row in sorted(order, key=self.lengths.__getitem__, reverse=True):  # stable: ties keep the shuffle
            fits = next((i for i, free in enumerate(room) if free >= self.lengths[row]), None)
            if fits is None:
                packs.append([row])
                room.append(self.pack_length - self.lengths[row])
            else:
                packs[fits].append(row)
                room[fits] -= self.lengths[row]
        return [tuple(pack) for pack in packs]

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        self.epoch += 1
        packs = self.packs(generator)
        packs = [packs[i] for i in torch.randperm(len(packs), generator=generator).tolist()]
        yield from (packs[i:i + self.batch_size] for i in range(0, len(packs), self.batch_size))

    def __len__(self) -> int:
        # The pack count does not depend on the shuffle's ties enough to matter for Lightning's progress and
        # schedule; count it once with the first epoch's seed.
        return math.ceil(len(self.packs(torch.Generator().manual_seed(self.seed))) / self.batch_size)


class Packs:
    """Rows indexed by pack: packs[(3, 7)] is [rows[3], rows[7]], what PackedBatchSampler's batches ask for."""

    def __init__(self, rows: list):
        self.rows = rows

    def __getitem__(self, pack: tuple[int, ...]) -> list:
        return [self.rows[i] for i in pack]

    def __len__(self) -> int:
        return len(self.rows)
