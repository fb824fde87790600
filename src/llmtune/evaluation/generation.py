"""Generated answers for Q&A rows, and the metrics that judge them against the references."""

from collections.abc import Callable

import torch
from omegaconf import DictConfig
from transformers import StoppingCriteria, StoppingCriteriaList

from llmtune.data.prompts import PromptFormat
from llmtune.evaluation.batches import length_sorted_batches
from llmtune.evaluation.intervals import bootstrap_intervals, generation_statistics
from llmtune.evaluation.metrics import ngram_similarity_per_row, rouge_per_row, text_generation_metrics


@torch.no_grad()
def answer_questions(model, tokenizer, rows: list[dict], prompt_format: PromptFormat, generation: DictConfig,
                     batch_size: int, desc: str = "generating") -> list[dict]:
    """Predictions for Q&A rows: {id, text, gold (reference), predicted (the answer's first line), tokens}.

    The answer is cut at its first line break: a base model that was never taught to stop would otherwise be judged on
    the paragraphs it adds after the answer. Batches are left-padded (generation appends on the right) and grouped by
    length, so little of each batch is padding. Generation runs with the KV cache and a row stops at EOS, at the
    token that closes the answer template (e.g. Gemma's <end_of_turn>), or once its first line is complete: what
    would follow is cut away anyway, so a batch ends when its last row is done rather than at max_new_tokens.
    """
    model.eval()
    prompts = [prompt_format.prompt(r["text"], r.get("context", "")) for r in rows]
    prompt_ids = [tokenizer(p).input_ids for p in prompts]
    sampling = ({"do_sample": True, "temperature": generation.temperature} if generation.do_sample
                else {"do_sample": False})
    stops = stop_token_ids(model, tokenizer, closing_texts(prompt_format))
    answers = [""] * len(rows)
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        for batch in length_sorted_batches([len(ids) for ids in prompt_ids], batch_size, desc):
            inputs = tokenizer.pad({"input_ids": [prompt_ids[i] for i in batch]}, return_tensors="pt").to(model.device)
            prompt_length = inputs["input_ids"].shape[1]
            first_line_done = DecodedTextStop(tokenizer, prompt_length, first_line_complete)
            output = model.generate(**inputs, max_new_tokens=generation.max_new_tokens, top_p=None, top_k=None,
                                    use_cache=True, eos_token_id=stops, pad_token_id=tokenizer.pad_token_id,
                                    stopping_criteria=StoppingCriteriaList([first_line_done]), **sampling)
            texts = tokenizer.batch_decode(output[:, prompt_length:], skip_special_tokens=True)
            for i, text in zip(batch, texts):
                answers[i] = first_line(text)
    finally:
        tokenizer.padding_side = padding_side
    return [{"id": r["id"], "text": r["text"], "gold": r["answer"], "predicted": answer, "tokens": r["tokens"],
             **({"slice": r["slice"]} if "slice" in r else {})} for r, answer in zip(rows, answers)]


def first_line(text: str) -> str:
    """The answer kept from a generated text: its first line, leading blank lines and outer spaces dropped."""
    return text.strip().split("\n")[0].strip()


def first_line_complete(text: str) -> bool:
    """Whether no further text can change first_line(text): a line break follows something other than whitespace."""
    return "\n" in text.lstrip()


def closing_texts(prompt_format: PromptFormat) -> list[str]:
    """What follows an answer in this prompt format (e.g. "<end_of_turn>"), as generation stop texts."""
    closing = prompt_format.answer_template.split("{answer}", 1)[1]
    return [closing] if closing.strip() else []


def stop_token_ids(model, tokenizer, stop_texts: list[str]) -> list[int]:
    """Token ids that end a generated row: the model's own EOS ids (its generation config, e.g. Gemma's <eos>), the
    tokenizer's EOS, and each stop text that is one token of its own (a chat format's turn end, e.g. <end_of_turn>,
    <|eot_id|>): a model tuned on answers closed by that token emits it where the answer ends. Stop texts of several
    tokens are not ids; DecodedTextStop stops on those."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = list(configured) if isinstance(configured, (list, tuple)) else [configured]
    ids.append(tokenizer.eos_token_id)
    for text in stop_texts:
        tokens = tokenizer(text, add_special_tokens=False).input_ids
        if len(tokens) == 1:
            ids.append(tokens[0])
    return list(dict.fromkeys(i for i in ids if i is not None))


class DecodedTextStop(StoppingCriteria):
    """Per row of a batch: done once done(text) holds for the row's new tokens decoded as the caller decodes them
    (special tokens skipped). Rows already done are not decoded again; generate pads them until every row is done."""

    def __init__(self, tokenizer, prompt_length: int, done: Callable[[str], bool]):
        self.tokenizer, self.prompt_length, self.done = tokenizer, prompt_length, done
        self.finished: torch.Tensor | None = None

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        if self.finished is None:
            self.finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for row in (~self.finished).nonzero().flatten().tolist():
            text = self.tokenizer.decode(input_ids[row, self.prompt_length:], skip_special_tokens=True)
            self.finished[row] = self.done(text)
        return self.finished.clone()


def token_presence(predictions: list[str], required: list[list[str]]) -> dict:
    """Share of the rows that list required tokens whose answer contains every one of them (case-insensitive)."""
    hits = [hit for hit in token_presence_per_row(predictions, required) if hit is not None]
    return {"token_presence": sum(hits) / len(hits) if hits else None, "n_token_rows": len(hits)}


def token_presence_per_row(predictions: list[str], required: list[list[str]]) -> list[float | None]:
    """1.0 where the answer contains every required token of its row, 0.0 where not, None where the row lists none."""
    return [float(all(t.lower() in p.lower() for t in tokens)) if tokens else None
            for p, tokens in zip(predictions, required)]


def qa_metrics(predictions: list[dict]) -> dict:
    """BLEU, ROUGE-1/2/L, bigram similarity and token presence of generated answers against the references, each with
    its 95% bootstrap interval."""
    answers, references = [p["predicted"] for p in predictions], [p["gold"] for p in predictions]
    required = [p["tokens"] for p in predictions]
    metrics = {**text_generation_metrics(answers, references), **token_presence(answers, required)}
    per_row = {**rouge_per_row(answers, references), "ngram_similarity": ngram_similarity_per_row(answers, references),
               "token_presence": token_presence_per_row(answers, required)}
    metrics["intervals"] = bootstrap_intervals(generation_statistics(answers, references, per_row), len(answers))
    return metrics
