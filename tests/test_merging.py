"""Scoring after training, predict and serve fold the LoRA adapter into the frozen weights: the same predictions as
scoring through the unmerged adapter, with no adapter matmuls left, and the adapter's own weights intact afterwards."""

import torch

from conftest import compose_config
from llmtune.data.prompts import PromptFormat
from llmtune.evaluation.scoring import label_log_likelihoods
from llmtune.models.loader import load_base_model
from llmtune.models.lora import add_lora
from llmtune.models.merging import adapter_merged, can_merge

FORMAT = PromptFormat("Classify the sentiment.", "{instruction}\n[{input}] =", " {answer}")
PROMPTS = [FORMAT.prompt(t) for t in ("Profit rose", "Sales fell sharply", "The firm is in Espoo", "Orders jumped")]
ANSWERS = [" positive", " negative", " neutral outlook"]


def lora_layer_calls(model) -> list:
    """A list that fills with one entry per forward of any LoRA A matrix (empty: the adapter did no work)."""
    calls = []
    for name, module in model.named_modules():
        if name.endswith("lora_A.default"):
            module.register_forward_hook(lambda *_: calls.append(1))
    return calls


def test_merged_scoring_equals_the_unmerged_adapter_and_unmerges_after(tiny_model_dir):
    cfg = compose_config(["model=tiny", "method=instruct"])
    tokenizer, base = load_base_model(str(tiny_model_dir), cfg.model)
    model = add_lora(base, cfg.model, cfg.method)
    torch.manual_seed(0)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:  # B starts at zero: give the adapter an effect to fold in
            parameter.data.normal_(0, 0.05)
    adapter = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    calls = lora_layer_calls(model)
    unmerged = label_log_likelihoods(model, tokenizer, PROMPTS, ANSWERS, batch_size=2)
    assert calls and can_merge(model)
    with model.disable_adapter():
        bare = label_log_likelihoods(model, tokenizer, PROMPTS, ANSWERS, batch_size=2)
    assert (unmerged - bare).abs().max() > 1e-2  # the adapter matters

    calls.clear()
    with adapter_merged(model):
        merged = label_log_likelihoods(model, tokenizer, PROMPTS, ANSWERS, batch_size=2)
    assert not calls  # merged: no adapter matmul ran
    torch.testing.assert_close(merged, unmerged, atol=1e-4, rtol=1e-4)
    for name, parameter in model.named_parameters():  # adapter as trained; frozen weights back (fp32: to rounding)
        expected = adapter.get(name, frozen.get(name))
        torch.testing.assert_close(parameter.detach(), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(label_log_likelihoods(model, tokenizer, PROMPTS, ANSWERS, batch_size=2), unmerged)


def test_a_4bit_base_is_never_merged(tiny_model_dir):
    cfg = compose_config(["model=tiny"])
    _, base = load_base_model(str(tiny_model_dir), cfg.model)
    model = add_lora(base, cfg.model, compose_config(["model=tiny", "method=instruct"]).method)
    model.config.quantization_config = {"load_in_4bit": True}  # what a qlora base carries
    assert not can_merge(model)
    with adapter_merged(model):
        assert not any(getattr(m, "merged", False) for m in model.modules())
