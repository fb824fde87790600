"""Label-set scoring: each allowed label's log-likelihood after the prompt; the best one is the prediction.

There is never an unparseable answer, and the softmax over the labels' log-likelihoods is a confidence.
Every prompt starts with the same instruction, so its keys and values are computed once and reused: for the default
sentiment prompt that is ~45 of ~80 tokens, about half the work.
"""

import copy
from contextlib import nullcontext

import torch

from llmtune.data.prompts import IGNORE_INDEX, PromptFormat, pad_batch, shared_prefix_length
from llmtune.evaluation.batches import length_sorted_batches
from llmtune.models.logits import labelled_logits, prefix_cache, vocabulary_subset


@torch.no_grad()
def label_log_likelihoods(model, tokenizer, prompts: list[str], answers: list[str], batch_size: int,
                          desc: str = "scoring", reuse_prefix: bool = True) -> torch.Tensor:
    """[len(prompts), len(answers)] summed log-probabilities of each answer's tokens after each prompt.

    When every answer is a single token, they are normalised over the answers instead of the whole vocabulary
    (the LM head keeps only the answers' rows): each row then differs from the full log-probabilities by one
    constant, so the argmax and the softmax over the answers, all that classification reads, are the same.
    """
    model.eval()
    prompt_ids = [tokenizer(p).input_ids for p in prompts]
    answer_ids = [tokenizer(a, add_special_tokens=False).input_ids for a in answers]
    prefix_length = shared_prefix_length(prompt_ids) if reuse_prefix else 0
    cache = prefix_cache(model, torch.tensor(prompt_ids[0][:prefix_length])) if prefix_length else None
    rests = [ids[prefix_length:] for ids in prompt_ids]
    scores = torch.full((len(prompts), len(answers)), float("nan"))
    # Single-token labels: every label is read off the first label's position, one forward per prompt.
    single_token = all(len(ids) == 1 for ids in answer_ids)
    head = vocabulary_subset(model, [ids[0] for ids in answer_ids]) if single_token else nullcontext()
    with head:
        for rows in length_sorted_batches([len(rest) for rest in rests], batch_size, desc):
            for j, ids in enumerate(answer_ids[:1] if single_token else answer_ids):
                batch = pad_batch([{"input_ids": rests[i] + ids, "labels": [IGNORE_INDEX] * len(rests[i]) + ids}
                                   for i in rows], tokenizer.pad_token_id)
                logits, targets, row_of = labelled_logits(model, batch, copy.deepcopy(cache))
                log_probs = torch.log_softmax(logits, dim=-1)
                if single_token:  # the head's rows are the answers, in order
                    scores[rows] = log_probs
                else:
                    token_log_probs = log_probs.gather(1, targets[:, None])[:, 0]
                    scores[rows, j] = torch.zeros(len(rows)).index_add_(0, row_of, token_log_probs)
    return scores


def classify(model, tokenizer, rows: list[dict], prompt_format: PromptFormat, labels: list[str], batch_size: int,
             desc: str = "scoring") -> list[dict]:
    """Predictions for rows: {id, text, gold, predicted, scores (softmax over labels), logits}."""
    prompts = [prompt_format.prompt(r["text"], r.get("context", "")) for r in rows]
    loglik = label_log_likelihoods(model, tokenizer, prompts, [prompt_format.answer(l) for l in labels],
                                   batch_size, desc)
    return labelled_predictions(rows, labels, loglik)


def labelled_predictions(rows: list[dict], labels: list[str], logits: torch.Tensor) -> list[dict]:
    """{id, text, gold, predicted, scores, logits} per row from its logit of each label (row i of logits: a label
    log-likelihood, or a classification head's output); scores are softmax(logits), which a run's temperature
    (llmtune.tasks.classification) later rescales."""
    records = []
    for row, row_logits in zip(rows, logits):
        predicted, scores = label_choice(labels, torch.softmax(row_logits, dim=0))
        records.append({"id": row["id"], "text": row["text"], "gold": row["label"], "predicted": predicted,
                        "scores": scores, "logits": {label: float(v) for label, v in zip(labels, row_logits)}})
    return records


def label_choice(labels: list[str], probs: torch.Tensor) -> tuple[str, dict[str, float]]:
    """The most probable label and every label's probability (5 decimals), from one row of probabilities."""
    return labels[int(probs.argmax())], {label: round(float(v), 5) for label, v in zip(labels, probs)}
