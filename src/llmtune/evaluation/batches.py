"""The one batching loop of scoring and generation: rows grouped by length (little padding), with progress."""

from collections.abc import Iterator

from llmtune.console import progress


def length_sorted_batches(lengths: list[int], batch_size: int, desc: str) -> Iterator[list[int]]:
    """Row indices in batches of up to batch_size, shortest rows first; callers write each result back at its row's
    own index, so the output keeps the input's order."""
    if batch_size < 1:  # range() with a step below 1 would yield no batch, and callers would read unwritten memory
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    starts = range(0, len(order), batch_size)
    for start in progress(starts, len(starts), desc, unit="batch"):
        yield order[start:start + batch_size]
