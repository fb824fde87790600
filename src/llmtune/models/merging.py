"""LoRA folded into the frozen weights for inference: scoring through an unmerged adapter runs the adapter's two small
matmuls beside every frozen one (about 30% slower for Gemma 3 270M, benchmarks/README.md); merged, the model is as
fast as its base. PEFT does the folding; a 4-bit base (qlora) is left unmerged, since folding into NF4 weights would
round the adapter away."""

from collections.abc import Iterator
from contextlib import contextmanager


def can_merge(model) -> bool:
    """A PEFT model whose adapter PEFT can fold into plain (not quantised) weights."""
    return hasattr(model, "merge_adapter") and getattr(model.config, "quantization_config", None) is None


def merged_for_inference(model):
    """The model with its adapter folded in for good (predict, serve: nothing trains afterwards); others as they are."""
    return model.merge_and_unload() if can_merge(model) else model


@contextmanager
def adapter_merged(model) -> Iterator[None]:
    """Inside the block the adapter is folded into the weights; unmerged afterwards, so the adapter's own weights are
    what is saved. Unmerging subtracts in the weights' dtype, which in bf16 does not give back the original bits: use it
    where nothing trains afterwards (the scoring after training), never between training steps."""
    if not can_merge(model):
        yield
        return
    model.merge_adapter()
    try:
        yield
    finally:
        model.unmerge_adapter()
