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
