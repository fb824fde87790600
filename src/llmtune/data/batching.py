"""Training batches of similar length: little compute spent on padding, order still random and seeded."""

import math
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Sampler

from llmtune.errors import UserError
from llmtune.training.distributed import shard


class ResumableLoader(DataLoader):
    """A training loader whose place in the epoch goes into every checkpoint: Lightning saves and restores the state of
    a loader that has state_dict / load_state_dict (its fit loop's "combined_loader"). Without it a run resumed from a
    checkpoint taken inside an epoch (callbacks.checkpoint.every_n_train_steps) would train that epoch's first
    batches again, the ones already trained on, and never its last ones. The state is its batch sampler's."""

    def state_dict(self) -> dict:
        return self.batch_sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.batch_sampler.load_state_dict(state)


class EpochPosition:
    """How far into which epoch a batch sampler has handed out batches; a restored position makes the next draw of
    that same epoch skip the batches handed out before (a later epoch is drawn whole).

    Under several processes (trainer=ddp) every rank draws the same epoch and trains on its share of each batch
    (rows rank, rank + world size, ...): trainer.batch_size stays the batch of one optimizer step, so a run on N
    devices takes the steps, and learns what, the run on one device does. A last batch with fewer rows than ranks is
    left out (every rank must step as often as the others). The position counts batches, equal on every rank, so
    the checkpoint rank 0 writes puts every rank back in its place."""

    position: tuple[int, int] = (0, 0)  # (epoch, batches handed out in it)
    resume_at: tuple[int, int] | None = None

    def state_dict(self) -> dict:
        return {"epoch": self.position[0], "batches": self.position[1]}

    def load_state_dict(self, state: dict) -> None:
        self.resume_at = (state["epoch"], state["batches"])

    def hand_out(self, epoch: int, batches: list) -> Iterator:
        rank, world = shard()
        if world > self.batch_size:
            raise UserError(f"trainer.batch_size={self.batch_size} is smaller than the {world} processes training: "
                            f"each needs a share of every batch; set trainer.batch_size to {world} or more")
        batches = [batch[rank::world] for batch in batches if len(batch) >= world]
        done = self.resume_at[1] if self.resume_at and self.resume_at[0] == epoch else 0
        self.resume_at, self.position = None, (epoch, done)
        for number, batch in enumerate(batches[done:], start=done + 1):
            self.position = (epoch, number)  # before the yield: a checkpoint after this batch counts it
            yield batch


def batches_of(items: int, batch_size: int, world: int) -> int:
    """Batches that `items` in order make, the last one left out when it has fewer items than ranks to share it."""
    full, rest = divmod(items, batch_size)
    return full + (0 < rest and rest >= world)


class LengthPoolBatchSampler(EpochPosition, Sampler[list[int]]):
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
        epoch = self.epoch
        generator = torch.Generator().manual_seed(self.seed + epoch)
        self.epoch += 1
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        batches = []
        for start in range(0, len(order), self.pool):
            pool = sorted(order[start:start + self.pool], key=self.lengths.__getitem__)
            batches += [pool[i:i + self.batch_size] for i in range(0, len(pool), self.batch_size)]
        shuffled = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        yield from self.hand_out(epoch, shuffled)

    def __len__(self) -> int:
        full, rest = divmod(len(self.lengths), self.pool)  # every pool but the last is a multiple of batch_size
        return full * math.ceil(self.pool / self.batch_size) + batches_of(rest, self.batch_size, shard()[1])


class PackedBatchSampler(EpochPosition, Sampler[list[tuple[int, ...]]]):
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
        epoch = self.epoch
        generator = torch.Generator().manual_seed(self.seed + epoch)
        self.epoch += 1
        packs = self.packs(generator)
        packs = [packs[i] for i in torch.randperm(len(packs), generator=generator).tolist()]
        yield from self.hand_out(epoch, [packs[i:i + self.batch_size] for i in range(0, len(packs), self.batch_size)])

    def __len__(self) -> int:
        # The pack count does not depend on the shuffle's ties enough to matter for Lightning's progress and
        # schedule; count it once with the first epoch's seed.
        return batches_of(len(self.packs(torch.Generator().manual_seed(self.seed))), self.batch_size, shard()[1])


class Packs:
    """Rows indexed by pack: packs[(3, 7)] is [rows[3], rows[7]], what PackedBatchSampler's batches ask for."""

    def __init__(self, rows: list):
        self.rows = rows

    def __getitem__(self, pack: tuple[int, ...]) -> list:
        return [self.rows[i] for i in pack]

    def __len__(self) -> int:
        return len(self.rows)
