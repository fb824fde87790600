"""Label-set scoring: each allowed label's log-likelihood after the prompt; the best one is the prediction.

There is never an unparseable answer, and the softmax over the labels' log-likelihoods is a confidence.
Every prompt starts with the same instruction, so its keys and values are computed once and reused: for the default
sentiment prompt that is ~45 of ~80 tokens, about half the work.
"""

import copy

import torch

from llmtune.data.prompts import IGNORE_INDEX, PromptFormat, pad_batch, shared_prefix_length
from llmtune.evaluation.batches import length_sorted_batches
from llmtune.models.logits import labelled_logits, output_head, prefix_cache, token_log_probs, vocabulary_subset


@torch.no_grad()
def label_log_likelihoods(model, tokenizer, prompts: list[str], answers: list[str], batch_size: int,
                          desc: str = "scoring", reuse_prefix: bool = True) -> torch.Tensor:
    """[len(prompts), len(answers)] summed log-probabilities of each answer's tokens after each prompt.

    Each prompt runs through the model once, whatever the number of answers: every answer's first token is read off
    the prompt's last position, and the answers' further tokens continue the prompt's keys and values
    (AnswerBranches). When every answer is a single token, they are normalised over the answers instead of the whole
    vocabulary (the LM head keeps only the answers' rows): each row then differs from the full log-probabilities by
    one constant, so the argmax and the softmax over the answers, all that classification reads, are the same.
    """
    model.eval()
    prompt_ids = [tokenizer(p).input_ids for p in prompts]
    answer_ids = [tokenizer(a, add_special_tokens=False).input_ids for a in answers]
    prefix_length = shared_prefix_length(prompt_ids) if reuse_prefix else 0
    cache = prefix_cache(model, torch.tensor(prompt_ids[0][:prefix_length])) if prefix_length else None
    rests = [ids[prefix_length:] for ids in prompt_ids]
    scores = torch.full((len(prompts), len(answers)), float("nan"))
    batches = length_sorted_batches([len(rest) for rest in rests], batch_size, desc)
    if all(len(ids) == 1 for ids in answer_ids):
        with vocabulary_subset(model, [ids[0] for ids in answer_ids]):  # the head's rows are the answers, in order
            for rows in batches:
                batch = pad_batch([{"input_ids": rests[i] + answer_ids[0],
                                    "labels": [IGNORE_INDEX] * len(rests[i]) + answer_ids[0]} for i in rows],
                                  tokenizer.pad_token_id)
                logits, _, _ = labelled_logits(model, batch, copy.deepcopy(cache))
                scores[rows] = torch.log_softmax(logits, dim=-1)
        return scores
    branches = AnswerBranches(answer_ids)
    for rows in batches:
        scores[rows] = branches.log_likelihoods(model, [rests[i] for i in rows], copy.deepcopy(cache),
                                                tokenizer.pad_token_id)
    return scores


class AnswerBranches:
    """Multi-token answers scored from one pass over the prompts.

    The prompt pass keeps its keys and values; its last position gives every answer's first token. An answer's further
    tokens are predicted by feeding its tokens but the last after the prompt: one branch per distinct such sequence,
    and an answer whose sequence starts a longer one reads that longer branch, so answers that differ only in their
    last token (or start another answer) share that work, the vocabulary-wide normaliser included. Each prompt's cache
    is repeated once per branch, and every branch of every prompt runs in one forward: for nine 4-token labels that is
    the prompt once plus 27 branch positions, where scoring label by label ran the prompt nine times.
    """

    def __init__(self, answer_ids: list[list[int]]):
        self.first_tokens = torch.tensor([ids[0] for ids in answer_ids])
        fed = sorted({tuple(ids[:-1]) for ids in answer_ids if len(ids) > 1}, key=len, reverse=True)
        self.branches: list[tuple[int, ...]] = []
        for sequence in fed:  # longest first, so a sequence that starts a kept branch finds it
            if not any(branch[:len(sequence)] == sequence for branch in self.branches):
                self.branches.append(sequence)
        self.width = max((len(branch) for branch in self.branches), default=0)
        # The branches laid end to end (branch k's tokens at positions start[k]...): which tokens each position must
        # score, and for each answer the (position, target) pairs whose log-probabilities add up to its tokens after the
        # first.
        starts = [sum(len(branch) for branch in self.branches[:k]) for k in range(len(self.branches))]
        targets: list[list[int]] = [[] for _ in range(sum(len(branch) for branch in self.branches))]
        self.reads: list[tuple[list[int], list[int]]] = []
        for ids in answer_ids:
            start = next((at for at, branch in zip(starts, self.branches) if branch[:len(ids) - 1] == tuple(ids[:-1])),
                         0)
            positions = [start + t for t in range(len(ids) - 1)]
            for position, token in zip(positions, ids[1:]):
                if token not in targets[position]:
                    targets[position].append(token)
            self.reads.append((positions, [targets[at].index(token) for at, token in zip(positions, ids[1:])]))
        most = max((len(t) for t in targets), default=0)
        self.targets = torch.tensor([t + [t[0]] * (most - len(t)) for t in targets], dtype=torch.long).view(-1, most)

    def log_likelihoods(self, model, rests: list[list[int]], cache, pad_id: int) -> torch.Tensor:
        """[len(rests), answers] for prompts that continue `cache` (a shared prefix's, or None) with `rests`."""
        rows, prefix_length = len(rests), cache.get_seq_length() if cache is not None else 0
        prompts = pad_batch([{"input_ids": rest, "labels": rest} for rest in rests], pad_id)
        lengths = prompts["attention_mask"].sum(1)
        attention = torch.cat([torch.ones((rows, prefix_length), dtype=torch.long), prompts["attention_mask"]], 1)
        if cache is not None:
            cache.batch_repeat_interleave(rows)
        last = torch.zeros_like(prompts["attention_mask"], dtype=torch.bool)
        last[torch.arange(rows), lengths - 1] = True
        with output_head(model, torch.nn.Identity()):  # hidden states out: token_log_probs applies the head
            out = model(input_ids=prompts["input_ids"], attention_mask=attention, past_key_values=cache,
                        use_cache=True, logits_to_keep=last)
        scores = token_log_probs(model, out.logits, self.first_tokens.expand(rows, -1))  # [B, answers]
        if self.branches:
            scores += self._after_first_tokens(model, out.past_key_values, attention, prefix_length + lengths, pad_id)
        return scores

    def _after_first_tokens(self, model, cache, attention: torch.Tensor, prompt_ends: torch.Tensor, pad_id: int
                            ) -> torch.Tensor:
        """[B, answers]: each answer's summed log-probabilities of its tokens after the first."""
        rows, count = len(prompt_ends), len(self.branches)
        branch_ids = torch.full((count, self.width), pad_id, dtype=torch.long)
        branch_mask = torch.zeros((count, self.width), dtype=torch.bool)
        for k, branch in enumerate(self.branches):
            branch_ids[k, :len(branch)], branch_mask[k, :len(branch)] = torch.tensor(branch), True
        cache.batch_repeat_interleave(count)  # each prompt's keys and values once per branch: rows (b, k), b major
        attention = torch.cat([attention.repeat_interleave(count, 0), branch_mask.long().repeat(rows, 1)], 1)
        # Right padding leaves gaps in the cache, so positions are given: each branch continues its own prompt.
        positions = prompt_ends.repeat_interleave(count)[:, None] + torch.arange(self.width)
        with output_head(model, torch.nn.Identity()):
            hidden = model(input_ids=branch_ids.repeat(rows, 1), attention_mask=attention, past_key_values=cache,
                           position_ids=positions, logits_to_keep=branch_mask.repeat(rows, 1)).logits
        log_probs = token_log_probs(model, hidden, self.targets.repeat(rows, 1)).view(rows, *self.targets.shape)
        scores = torch.zeros((rows, len(self.reads)))
        for j, (positions, picks) in enumerate(self.reads):
            if positions:
                scores[:, j] = log_probs[:, positions, picks].sum(1)
        return scores


def classify(model, tokenizer, rows: list[dict], prompt_format: PromptFormat, labels: list[str], batch_size: int,
             desc: str = "scoring") -> list[dict]:
    """Predictions for rows: {id, text, gold, predicted, scores (softmax over labels), logits}."""
    prompts = [prompt_format.prompt(r["text"], r.get("context", "")) for r in rows]
    loglik = label_log_likelihoods(model, tokenizer, prompts, [prompt_format.answer(l) for l in labels],
                                   batch_size, desc)
    return labelled_predictions(rows, labels, loglik)


def labelled_predictions(rows: list[dict], labels: list[str], logits: torch.Tensor) -> list[dict]:
    """{id, text, gold, predicted, scores, logits, and the row's slice if it has one} per row from its logit of each
    label (row i of logits: a label log-likelihood, or a classification head's output); scores are softmax(logits),
    which a run's temperature (llmtune.tasks.classification) later rescales."""
    records = []
    for row, row_logits in zip(rows, logits):
        predicted, scores = label_choice(labels, torch.softmax(row_logits, dim=0))
        records.append({"id": row["id"], "text": row["text"], "gold": row["label"], "predicted": predicted,
                        "scores": scores, "logits": {label: float(v) for label, v in zip(labels, row_logits)},
                        **({"slice": row["slice"]} if "slice" in row else {})})
    return records


def label_choice(labels: list[str], probs: torch.Tensor) -> tuple[str, dict[str, float]]:
    """The most probable label and every label's probability (5 decimals), from one row of probabilities."""
    return labels[int(probs.argmax())], {label: round(float(v), 5) for label, v in zip(labels, probs)}
