"""Logits only where a label sits: the one place that projects hidden states onto the vocabulary."""

import torch
import torch.nn.functional as F

from llmtune.data.prompts import IGNORE_INDEX


def prefix_cache(model, prefix_ids: torch.Tensor):
    """Keys and values of a token prefix shared by every sequence of a batch (kept in the autograd graph)."""
    return model(input_ids=prefix_ids[None], use_cache=True).past_key_values


def labelled_logits(model, batch: dict[str, torch.Tensor], cache=None):
    """(logits [N, V], targets [N], row of each [N]) for the N positions whose next token carries a label.

    Position t predicts token t+1. For a classification prompt of ~45 tokens with a one-token answer, Gemma's
    262,144 x 640 lm_head at every position would cost 45 x 168M MACs per example, about 4x the whole backbone;
    at the answer position only it costs 1/45 of that. transformers flattens a boolean logits_to_keep mask in
    (batch, position) order, the same order as boolean indexing of the labels below.

    With `cache` (from prefix_cache), every sequence of the batch continues that prefix: the prefix is computed once
    instead of once per row, and the cache is broadcast to the batch in place.
    """
    labels, attention_mask, forward_kwargs = batch["labels"], batch["attention_mask"], {}
    if cache is not None:
        rows, prefix_length = len(labels), cache.get_seq_length()
        cache.batch_repeat_interleave(rows)
        prefix_mask = torch.ones((rows, prefix_length), dtype=attention_mask.dtype, device=attention_mask.device)
        attention_mask = torch.cat([prefix_mask, attention_mask], dim=1)
        forward_kwargs["past_key_values"] = cache
    predicts_label = labels[:, 1:] != IGNORE_INDEX                       # [B, L-1]
    keep = F.pad(predicts_label, (0, 1), value=False)                    # [B, L]
    logits = model(input_ids=batch["input_ids"], attention_mask=attention_mask,
                   logits_to_keep=keep, **forward_kwargs).logits        # [N, V]
    targets = labels[:, 1:][predicts_label]                              # [N]
    rows = torch.arange(len(labels), device=labels.device)[:, None].expand_as(predicts_label)[predicts_label]
    return logits.float(), targets, rows
