"""Logits only where a label sits: the one place that projects hidden states onto the vocabulary."""

from contextlib import contextmanager

import torch
import torch.nn.functional as F

from llmtune.data.prompts import IGNORE_INDEX


def prefix_cache(model, prefix_ids: torch.Tensor):
    """Keys and values of a token prefix shared by every sequence of a batch (kept in the autograd graph).

    The prefix predicts no label, so the LM head is skipped (an all-False logits_to_keep mask): left to its default
    it would project all ~45 prefix positions onto Gemma's 262,144-token vocabulary, 45 x 168M MACs (~10% of a
    training step here) for logits nobody reads.
    """
    no_position = torch.zeros((1, len(prefix_ids)), dtype=torch.bool, device=prefix_ids.device)
    return model(input_ids=prefix_ids[None], use_cache=True, logits_to_keep=no_position).past_key_values


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
    if "position_ids" in batch:  # packed rows (pack_batch): the position ids alone keep the examples apart
        attention_mask, forward_kwargs = None, {"position_ids": batch["position_ids"], "use_cache": False}
    predicts_label = labels[:, 1:] != IGNORE_INDEX                       # [B, L-1]
    keep = F.pad(predicts_label, (0, 1), value=False)                    # [B, L]
    logits = model(input_ids=batch["input_ids"], attention_mask=attention_mask,
                   logits_to_keep=keep, **forward_kwargs).logits        # [N, V]
    targets = labels[:, 1:][predicts_label]                              # [N]
    rows = torch.arange(len(labels), device=labels.device)[:, None].expand_as(predicts_label)[predicts_label]
    return logits.float(), targets, rows


@contextmanager
def output_head(model, head: torch.nn.Module):
    """Inside the block the model's LM head is `head`; the model's own comes back afterwards."""
    original = model.get_output_embeddings()
    model.set_output_embeddings(head)
    try:
        yield
    finally:
        model.set_output_embeddings(original)


def vocabulary_subset(model, token_ids: list[int]):
    """Inside the block the model's LM head has only token_ids' rows: logits come out [..., len(token_ids)], in fp32.

    Label scoring with single-token labels needs nothing else: the softmax over the labels is the same with or
    without the other rows (the full vocabulary's normaliser is a per-row constant that cancels), and the head shrinks
    from 262,144 rows (a 335 MB bf16 read per batch for Gemma 3, memory-bound) to three. Anything the model does to
    logits afterwards (Gemma 2's soft-capping) still applies: only the head module is swapped.

    The few rows run in fp32, which costs nothing at this size: a bf16 logit of 16 to 32 is rounded to a multiple of
    1/8, so two labels' scores often tied exactly and the first label in the list won the tie.
    """
    return output_head(model, LabelHead(model.get_output_embeddings(), token_ids))


class LabelHead(torch.nn.Module):
    """An LM head's rows for a few tokens, applied in fp32 to the hidden states whatever their dtype."""

    def __init__(self, head: torch.nn.Module, token_ids: list[int]):
        super().__init__()
        rows = torch.tensor(token_ids, device=head.weight.device)
        self.register_buffer("weight", head.weight.detach()[rows].float())
        self.register_buffer("bias", None if getattr(head, "bias", None) is None else head.bias.detach()[rows].float())

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden.float(), self.weight, self.bias)


def token_log_probs(model, hidden: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """[N, T] fp32 log-probabilities of token_ids [N, T] (a few tokens per position) from N positions' final hidden
    states [N, hidden size], as the model's own logits would give them: its LM head, then any soft-capping the model
    applies after it (Gemma 2), normalised over the whole vocabulary. The head runs a chunk of positions at a time, so
    [N, vocabulary] logits are never held at once (for Gemma's 262,144 tokens one position's are 1 MB)."""
    head = model.get_output_embeddings()
    cap = getattr(model.config, "final_logit_softcapping", None)
    chunk = max(1, ChunkedCrossEntropy.CHUNK_BYTES // (4 * head.weight.shape[0]))
    out = torch.empty(token_ids.shape, dtype=torch.float32, device=hidden.device)
    for start in range(0, len(hidden), chunk):
        logits = head(hidden[start:start + chunk].to(head.weight.dtype))
        if cap:
            logits = torch.tanh(logits / cap) * cap
        logits = logits.float()
        out[start:start + chunk] = logits.gather(1, token_ids[start:start + chunk]) - logits.logsumexp(1, keepdim=True)
    return out


def labelled_loss(model, batch: dict[str, torch.Tensor], cache=None, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled positions: labelled_logits + F.cross_entropy, the same value
    and gradients, without ever holding the [positions, vocabulary] logits.

    With the loss on every token (method=causal) a batch of 8 rows of ~80 tokens has ~640 labelled positions: 640 x
    262,144 fp32 logits are 671 MB, and the cast, log-softmax and their backward each write another such tensor; that
    memory traffic was over half of a causal training step here. The model runs with its LM head swapped out, so it
    returns the labelled positions' hidden states, and ChunkedCrossEntropy applies the frozen head to them 64 (for
    Gemma's vocabulary) at a time. A head that trains, carries a bias, or whose logits the model reshapes after the head
    (final_logit_softcapping: Gemma 2) takes the plain path.

    label_smoothing (F.cross_entropy's): the target puts that mass evenly over the vocabulary, the rest on the label.
    """
    head = model.get_output_embeddings()
    plain = (head.weight.requires_grad or getattr(head, "bias", None) is not None
             or getattr(model.config, "final_logit_softcapping", None))
    if plain:
        logits, targets, _ = labelled_logits(model, batch, cache)
        return F.cross_entropy(logits, targets, label_smoothing=label_smoothing)
    with output_head(model, torch.nn.Identity()):
        hidden, targets, _ = labelled_logits(model, batch, cache)        # [N, hidden size]
    return ChunkedCrossEntropy.apply(hidden.to(head.weight.dtype), head.weight, targets, label_smoothing)


class ChunkedCrossEntropy(torch.autograd.Function):
    """mean(cross_entropy(hidden @ weight.T, targets, label_smoothing)) for a frozen weight, a chunk of positions
    at a time.

    The gradient with respect to hidden is computed in the forward pass, chunk by chunk, while each chunk's logits
    are at hand: d loss / d logits = (softmax - target) / N, and d loss / d hidden = that @ weight. The target is
    one_hot, or with smoothing s: (1 - s) one_hot + s / V, whose loss is log_norm - (1 - s) logit[label] - s
    mean(logits). So nothing of size [N, vocabulary] is kept for the backward pass, and two chunk-sized buffers serve
    every chunk. Precision follows the plain path: logits come out of the matmul in the weight's dtype and the softmax
    runs in fp32.
    """

    CHUNK_BYTES = 64 << 20  # fp32 logits per chunk: 64 rows of Gemma's 262,144-token vocabulary

    @staticmethod
    def forward(ctx, hidden, weight, targets, smoothing=0.0):
        count, vocabulary = len(targets), weight.shape[0]
        rows = max(1, ChunkedCrossEntropy.CHUNK_BYTES // (4 * vocabulary))
        logits = torch.empty((min(rows, count), vocabulary), dtype=weight.dtype, device=weight.device)
        probs = torch.empty(logits.shape, dtype=torch.float32, device=weight.device)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None  # not while validating
        total = torch.zeros((), dtype=torch.float32, device=weight.device)
        for start in range(0, count, rows):
            n = min(rows, count - start)
            chunk_logits, chunk_probs, chunk_targets = logits[:n], probs[:n], targets[start:start + n]
            torch.mm(hidden[start:start + n], weight.T, out=chunk_logits)
            chunk_probs.copy_(chunk_logits)
            log_norm = torch.logsumexp(chunk_probs, dim=1)
            picked = chunk_probs.gather(1, chunk_targets[:, None])[:, 0]
            if smoothing:
                picked = (1 - smoothing) * picked + smoothing * chunk_probs.mean(dim=1)
            total += (log_norm - picked).sum()
            if grad_hidden is None:
                continue
            chunk_probs.sub_(log_norm[:, None]).exp_()                    # softmax, in place
            if smoothing:
                chunk_probs.sub_(smoothing / vocabulary)
            chunk_probs[torch.arange(n, device=weight.device), chunk_targets] -= 1 - smoothing
            chunk_logits.copy_(chunk_probs.div_(count))                   # d loss / d logits, in the matmul dtype
            torch.mm(chunk_logits, weight, out=grad_hidden[start:start + n])
        ctx.save_for_backward(grad_hidden)
        return total / count

    @staticmethod
    def backward(ctx, grad_loss):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_loss.to(grad_hidden.dtype), None, None, None
