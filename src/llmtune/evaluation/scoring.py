"""Label-set scoring: each allowed label's log-likelihood after the prompt; the best one is the prediction.

There is never an unparseable answer, and the softmax over the labels' log-likelihoods is a confidence.
"""

import torch
from tqdm.auto import tqdm

from llmtune.data.prompts import PromptFormat, encode_example, pad_batch
from llmtune.models.logits import labelled_logits


@torch.no_grad()
def label_log_likelihoods(model, tokenizer, prompts: list[str], answers: list[str], batch_size: int,
                          desc: str = "scoring") -> torch.Tensor:
    """[len(prompts), len(answers)] summed log-probabilities of each answer's tokens after each prompt."""
    model.eval()
    answer_ids = [tokenizer(a, add_special_tokens=False).input_ids for a in answers]
    single_token = all(len(ids) == 1 for ids in answer_ids)
    scores = []
    for start in tqdm(range(0, len(prompts), batch_size), desc=desc, unit="batch", leave=False):
        chunk = prompts[start:start + batch_size]
        if single_token:  # one forward per prompt: all labels read off the same next-token distribution
            scores.append(_next_token_scores(model, tokenizer, chunk, [ids[0] for ids in answer_ids]))
        else:             # one forward per (prompt, label): sum over the label's tokens
            scores.append(torch.stack([_sequence_scores(model, tokenizer, chunk, a) for a in answers], dim=1))
    return torch.cat(scores)


def _next_token_scores(model, tokenizer, prompts, label_token_ids):
    encoded = [tokenizer(p).input_ids for p in prompts]
    batch = pad_batch([{"input_ids": ids, "labels": ids} for ids in encoded], tokenizer.pad_token_id)
    last = batch["attention_mask"].sum(dim=1) - 1                       # right padding: last real token
    keep = torch.zeros_like(batch["attention_mask"], dtype=torch.bool)
    keep[torch.arange(len(prompts)), last] = True
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep).logits
    return torch.log_softmax(logits.float(), dim=-1)[:, label_token_ids]


def _sequence_scores(model, tokenizer, prompts, answer):
    batch = pad_batch([encode_example(tokenizer, p, answer, loss_on="answer") for p in prompts],
                      tokenizer.pad_token_id)
    logits, targets, rows = labelled_logits(model, batch)
    token_logp = torch.log_softmax(logits, dim=-1).gather(1, targets[:, None])[:, 0]
    return torch.zeros(len(prompts)).index_add_(0, rows, token_logp)


def classify(model, tokenizer, rows: list[dict], prompt_format: PromptFormat, labels: list[str], batch_size: int,
             desc: str = "scoring") -> list[dict]:
    """Predictions for rows: {id, text, gold, predicted, scores (softmax over labels)}."""
    prompts = [prompt_format.prompt(r["text"]) for r in rows]
    loglik = label_log_likelihoods(model, tokenizer, prompts, [prompt_format.answer(l) for l in labels],
                                   batch_size, desc)
    probs = torch.softmax(loglik, dim=1)
    return [{"id": r["id"], "text": r["text"], "gold": r["label"], "predicted": labels[int(p.argmax())],
             "scores": {label: round(float(v), 5) for label, v in zip(labels, p)}}
            for r, p in zip(rows, probs)]
