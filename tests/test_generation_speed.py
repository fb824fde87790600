"""Generation through a LoRA adapter at the bare model's speed: the LM head gets a contiguous input (torch otherwise
broadcasts a frozen head's weight to [batch, hidden, vocabulary] at every prefill), the KV cache is used, and a batch
stops once every row has ended (EOS, the answer template's closing token, or a complete first line)."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import compose_config
from omegaconf import OmegaConf
from peft import LoraConfig, get_peft_model

from llmtune.data.prompts import PromptFormat
from llmtune.evaluation.generation import answer_questions, first_line_complete, stop_token_ids
from llmtune.inference import LoadedRun
from llmtune.models.loader import load_base_model

FORMAT = PromptFormat("Answer the question.", "{instruction}\n{input}\nanswer:", " {answer}")
QUESTIONS = ["what rose", "what fell sharply in the quarter", "sales"]  # different lengths: left padding at work
GREEDY = OmegaConf.create({"max_new_tokens": 12, "do_sample": False, "temperature": 1.0})


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    """The tiny model as llmtune loads it, and the same weights with a LoRA adapter (B nonzero, so it matters)."""
    cfg = compose_config(["model=tiny"])
    tokenizer, base = load_base_model(str(tiny_model_dir), cfg.model)
    _, frozen = load_base_model(str(tiny_model_dir), cfg.model)
    adapted = get_peft_model(frozen, LoraConfig(task_type="CAUSAL_LM", r=4, target_modules="all-linear"))
    torch.manual_seed(0)
    for name, parameter in adapted.named_parameters():
        if "lora_B" in name:
            parameter.data.normal_(0, 0.2)
    return tokenizer, base.eval(), adapted.eval()


def batch(tokenizer, texts=QUESTIONS):
    tokenizer.padding_side = "left"
    return tokenizer([FORMAT.prompt(t) for t in texts], return_tensors="pt", padding=True)


def test_adapter_generation_never_broadcasts_the_frozen_head_and_keeps_last_position_logits(tiny):
    tokenizer, _, adapted = tiny
    head = adapted.get_output_embeddings()
    assert not head.weight.requires_grad  # frozen under LoRA: the case torch does not fold
    seen = []  # (input contiguous, output shape) per head call, as F.linear receives them
    hook = head.register_forward_hook(lambda module, args, out: seen.append((args[0].is_contiguous(), out.shape)))
    inputs = batch(tokenizer)
    rows, hidden, vocabulary = len(QUESTIONS), head.in_features, head.out_features
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
            adapted.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    finally:
        hook.remove()
    assert seen == [(True, (rows, 1, vocabulary))] * 3  # logits_to_keep=1 survives PEFT's wrapper; input contiguous
    broadcast = [e.key for e in prof.events() if [rows, hidden, vocabulary] in [list(s) for s in e.input_shapes]]
    assert not broadcast  # no op saw the head's weight expanded to the batch (aten::expand/copy_/bmm before)


def test_adapter_generation_equals_the_merged_weights_and_uses_the_kv_cache(tiny):
    tokenizer, _, adapted = tiny
    inputs = batch(tokenizer)
    steps = []  # input_ids length of each forward: the whole prompt once, then one token per step with the cache
    hook = adapted.get_base_model().register_forward_pre_hook(
        lambda module, args, kwargs: steps.append(kwargs["input_ids"].shape[1]), with_kwargs=True)
    try:
        unmerged = adapted.generate(**inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False,
                                    pad_token_id=tokenizer.pad_token_id)
    finally:
        hook.remove()
    assert steps == [inputs["input_ids"].shape[1], 1, 1, 1, 1]
    with adapted.disable_adapter():
        bare = adapted.generate(**inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id)
    adapted.merge_adapter()  # fp32: folded weights give the same logits to rounding, so the same greedy tokens
    try:
        merged = adapted.generate(**inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False,
                                  pad_token_id=tokenizer.pad_token_id)
    finally:
        adapted.unmerge_adapter()
    assert torch.equal(unmerged, merged)
    assert not torch.equal(unmerged, bare)  # the adapter changes what is generated: the comparison means something


class ScriptedHead(torch.nn.Module):
    """An LM head that writes scripted text: row r's step-s logits put all weight on script[r][s] (then on fill)."""

    def __init__(self, vocabulary: int, script: list[list[int]], fill: int):
        super().__init__()
        self.vocabulary, self.script, self.fill, self.calls = vocabulary, script, fill, 0

    def forward(self, hidden):
        logits = torch.zeros(*hidden.shape[:-1], self.vocabulary)
        for row, tokens in enumerate(self.script):
            logits[row, ..., tokens[self.calls] if self.calls < len(tokens) else self.fill] = 100.0
        self.calls += 1
        return logits


def token(tokenizer, text: str) -> int:
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert len(ids) == 1, (text, ids)
    return ids[0]


def test_answer_questions_stops_when_every_row_has_its_first_line_or_eos(tiny):
    tokenizer, base, _ = tiny
    a, b, newline, eos = (token(tokenizer, t) for t in ("positive", "negative", "\n", "<eos>"))
    # Row 0 opens with a blank line (kept generating: the answer is the first non-blank line), row 1 ends at EOS,
    # row 2 has its first line after three tokens; every row would go on to max_new_tokens with the filler.
    texts = ["what rose"] * 3  # one prompt length: the length-sorted batch keeps the rows in order
    script = [[newline, a, newline, b], [b, eos], [a, b, newline, a]]
    original = base.get_output_embeddings()
    head = ScriptedHead(original.out_features, script, fill=a)
    base.set_output_embeddings(head)
    try:
        rows = [{"id": i, "text": t, "answer": "", "tokens": []} for i, t in enumerate(texts)]
        answers = [p["predicted"] for p in answer_questions(base, tokenizer, rows, FORMAT, GREEDY, batch_size=3)]
    finally:
        base.set_output_embeddings(original)
    assert head.calls == 3  # the last row's line break, not max_new_tokens (12)
    assert answers == ["positive", "negative", "positivenegative"]


def test_stop_ids_are_the_eos_ids_and_single_token_closing_texts(tiny):
    tokenizer, base, _ = tiny
    assert stop_token_ids(base, tokenizer, []) == [tokenizer.eos_token_id]
    closing = token(tokenizer, "<pad>")  # stands in for a chat format's turn end, e.g. Gemma's <end_of_turn>
    assert stop_token_ids(base, tokenizer, ["<pad>", "positive negative"]) == [tokenizer.eos_token_id, closing]
    assert not first_line_complete("\n\n  ") and not first_line_complete("answer") and first_line_complete(" a\nb")


def test_loaded_run_generate_stops_at_a_stop_text_instead_of_max_new_tokens(tiny):
    tokenizer, base, _ = tiny
    a, b, newline = (token(tokenizer, t) for t in ("positive", "negative", "\n"))
    original = base.get_output_embeddings()
    head = ScriptedHead(original.out_features, [[a, b, newline, a, a]], fill=a)
    run = LoadedRun(Path("run"), OmegaConf.create({}), tokenizer, base, FORMAT, None, SimpleNamespace(generates=True))
    base.set_output_embeddings(head)
    try:
        result = run.generate(FORMAT.prompt("what rose"), max_new_tokens=20, stop=["\n"])
    finally:
        base.set_output_embeddings(original)
    assert head.calls == 3 and result["completion_tokens"] == 3
    assert result["text"] == "positivenegative" and result["finish_reason"] == "stop"
