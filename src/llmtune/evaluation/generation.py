"""Generated answers for Q&A rows, and the metrics that judge them against the references."""

import torch
from omegaconf import DictConfig

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
    length, so little of each batch is padding.
    """
    model.eval()
    prompts = [prompt_format.prompt(r["text"], r.get("context", "")) for r in rows]
    prompt_ids = [tokenizer(p).input_ids for p in prompts]
    sampling = ({"do_sample": True, "temperature": generation.temperature} if generation.do_sample
                else {"do_sample": False})
    answers = [""] * len(rows)
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        for batch in length_sorted_batches([len(ids) for ids in prompt_ids], batch_size, desc):
            inputs = tokenizer.pad({"input_ids": [prompt_ids[i] for i in batch]}, return_tensors="pt").to(model.device)
            output = model.generate(**inputs, max_new_tokens=generation.max_new_tokens, top_p=None, top_k=None,
                                    pad_token_id=tokenizer.pad_token_id, **sampling)
            texts = tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
            for i, text in zip(batch, texts):
                answers[i] = text.strip().split("\n")[0].strip()
    finally:
        tokenizer.padding_side = padding_side
    return [{"id": r["id"], "text": r["text"], "gold": r["answer"], "predicted": answer, "tokens": r["tokens"]}
            for r, answer in zip(rows, answers)]


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
