"""int8 scoring (llmtune.models.int8): only the decoder's linear layers turn int8, label scores stay those of the
fp32 model within int8's rounding, a LoRA adapter is merged before quantising, and a missing kernel is one line."""

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import compose_config
from llmtune.data.prompts import PromptFormat
from llmtune.errors import UserError
from llmtune.evaluation.scoring import label_log_likelihoods
from llmtune.models import int8
from llmtune.models.int8 import Int8Linear, quantize_linears_int8
from llmtune.models.loader import load_base_model
from llmtune.models.lora import add_lora

FORMAT = PromptFormat("Classify the sentiment.", "{instruction}\n[{input}] =", " {answer}")
PROMPTS = [FORMAT.prompt(t) for t in ("Operating profit rose to EUR 4 mn", "Net sales fell by 12 percent",
                                      "The company is based in Espoo", "Orders jumped sharply", "The plant closed")]
ANSWERS = [" positive", " negative", " neutral"]
# Per-token int8 activations and per-channel int8 weights: ~0.5% relative error per layer. Through the tiny model's
# two layers the label log-likelihoods move by well under this.
LOG_LIKELIHOOD_TOLERANCE = 0.02


@pytest.fixture
def tiny(tiny_model_dir):
    tokenizer, model = load_base_model(str(tiny_model_dir), compose_config(["model=tiny"]).model)
    return tokenizer, model.eval()


def decoder_linears(model) -> dict[str, nn.Module]:
    return {name: module for name, module in model.get_decoder().named_modules()
            if isinstance(module, (nn.Linear, Int8Linear))}


def test_only_the_decoder_s_linear_layers_become_int8(tiny):
    _, model = tiny
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    head_weight, embedding_weight = head.weight.detach().clone(), embeddings.weight.detach().clone()
    names = set(decoder_linears(model))
    assert len(names) == 2 * 7  # two layers of q, k, v, o, gate, up, down

    quantized = quantize_linears_int8(model)
    assert quantized is model
    assert set(decoder_linears(model)) == names
    assert all(type(m) is Int8Linear for m in decoder_linears(model).values())
    assert model.get_output_embeddings() is head and type(head) is nn.Linear
    assert model.get_input_embeddings() is embeddings
    assert torch.equal(head.weight, head_weight) and torch.equal(embeddings.weight, embedding_weight)


def test_tied_embeddings_stay_tied_and_unquantised():
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # as Gemma has them
    quantize_linears_int8(model)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert type(model.get_output_embeddings()) is nn.Linear


def test_int8_linear_matches_the_linear_within_int8_rounding():
    torch.manual_seed(0)
    linear = nn.Linear(64, 48, bias=True)
    x = torch.randn(3, 5, 64)
    expected = linear(x)
    quantized = Int8Linear(linear)
    got = quantized(x)
    assert got.shape == expected.shape and got.dtype == torch.float32
    assert ((got - expected).norm() / expected.norm()) < 0.02
    assert quantized(x.bfloat16()).dtype == torch.bfloat16  # output in the input's dtype


def test_int8_scoring_keeps_the_fp32_labels(tiny):
    tokenizer, model = tiny
    reference = label_log_likelihoods(model, tokenizer, PROMPTS, ANSWERS, batch_size=2)
    scores = label_log_likelihoods(quantize_linears_int8(model), tokenizer, PROMPTS, ANSWERS, batch_size=2)
    torch.testing.assert_close(scores, reference, atol=LOG_LIKELIHOOD_TOLERANCE, rtol=0)
    top_two = reference.topk(2, dim=1).values
    clear = (top_two[:, 0] - top_two[:, 1]) > 2 * LOG_LIKELIHOOD_TOLERANCE  # no rounding can flip these
    assert clear.sum() >= 3
    assert torch.equal(scores.argmax(1)[clear], reference.argmax(1)[clear])


def test_siblings_quantise_their_shared_input_once(tiny, monkeypatch):
    tokenizer, model = tiny
    quantize_linears_int8(model)
    calls = []
    quantize_rows = int8._quantize_rows
    monkeypatch.setattr(int8, "_quantize_rows", lambda rows: calls.append(rows.shape) or quantize_rows(rows))
    with torch.no_grad():
        model(**tokenizer(PROMPTS[:1], return_tensors="pt"))
    # per layer: the attention input (q, k, v), o's input, the MLP input (gate, up), down's input
    assert len(calls) == 2 * 4


def test_a_lora_model_is_merged_then_quantised(tiny):
    tokenizer, base = tiny
    model = add_lora(base, compose_config(["model=tiny"]).model,
                     compose_config(["model=tiny", "method=instruct"]).method)
    torch.manual_seed(0)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:  # B starts at zero: give the adapter an effect, well above int8's rounding
            parameter.data.normal_(0, 0.3)
    with torch.no_grad():
        reference = label_log_likelihoods(model, tokenizer, PROMPTS, ANSWERS, batch_size=2)
        with model.disable_adapter():
            bare = label_log_likelihoods(model, tokenizer, PROMPTS, ANSWERS, batch_size=2)
    assert (reference - bare).abs().max() > 5 * LOG_LIKELIHOOD_TOLERANCE  # the adapter matters

    quantized = quantize_linears_int8(model)
    assert not any("lora" in name for name, _ in quantized.named_modules())
    assert all(type(m) is Int8Linear for m in decoder_linears(quantized).values())
    scores = label_log_likelihoods(quantized, tokenizer, PROMPTS, ANSWERS, batch_size=2)
    torch.testing.assert_close(scores, reference, atol=LOG_LIKELIHOOD_TOLERANCE, rtol=0)


def broken_int_mm(*args, **kwargs):
    raise RuntimeError("_int_mm: not implemented for 'CPU'\nsecond line")


@pytest.mark.parametrize("break_kernel", [
    lambda monkeypatch: monkeypatch.setattr(torch, "_int_mm", broken_int_mm),
    lambda monkeypatch: monkeypatch.delattr(torch, "_int_mm"),
    lambda monkeypatch: monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False),
], ids=["kernel-fails", "no-kernel", "no-onednn"])
def test_an_unavailable_kernel_is_a_one_line_user_error(tiny, monkeypatch, break_kernel):
    _, model = tiny
    break_kernel(monkeypatch)
    with pytest.raises(UserError, match="quantize=int8") as error:
        quantize_linears_int8(model)
    assert "\n" not in str(error.value)
    assert all(type(m) is nn.Linear for m in decoder_linears(model).values())  # nothing replaced


def test_a_model_off_the_cpu_is_a_user_error(tiny):
    _, model = tiny
    with pytest.raises(UserError, match="CPU only"):
        quantize_linears_int8(model.to("meta"))


def test_a_decoder_without_linear_layers_is_a_user_error(tiny):
    _, model = tiny
    quantize_linears_int8(model)
    with pytest.raises(UserError, match="no nn.Linear"):
        quantize_linears_int8(model)  # already int8: nothing left to quantise
