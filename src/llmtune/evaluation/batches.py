"""The one batching loop of scoring and generation: rows grouped by length (little padding), with progress."""

from collections.abc import Iterator

from tqdm.auto import tqdm


def length_sorted_batches(lengths: list[int], batch_size: int, desc: str) -> Iterator[list[int]]:
    """Row indices in batches of up to batch_size, shortest rows first; callers write each result back at its row's
    own index, so the output keeps the input's order."""
    if batch_size < 1:  # range() with a step below 1 would yield no batch, and callers would read unwritten memory
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", leave=False):
        yield order[start:start + batch_size]
