"""GGUF export of the tiny Llama, checked by loading it back with transformers' GGUF loader and reading it with gguf."""

import json

import gguf
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmtune.errors import UserError
from llmtune.export.gguf_writer import OUTTYPES, write_gguf

SENTENCES = ["The movie was great, a positive answer.", "question: context? sentiment label negative",
             "Hello  world\n\n\ttabs üñí 123", "<eos> special tokens <pad> stay whole"]


@pytest.fixture(scope="module")
def exports(tiny_model_dir, tmp_path_factory):
    """The tiny model exported once per outtype."""
    out_dir = tmp_path_factory.mktemp("gguf")
    return {outtype: write_gguf(tiny_model_dir, out_dir / f"tiny-{outtype}.gguf", outtype) for outtype in OUTTYPES}


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    """The original model's logits on every sentence, with the HF tokenizer's ids."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    ids = [tokenizer(text)["input_ids"] for text in SENTENCES]
    with torch.no_grad():
        return ids, [model(torch.tensor([i])).logits[0] for i in ids]


def load_logits(path, ids):
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        return [model(torch.tensor([i])).logits[0] for i in ids]


def test_f32_round_trips_weights_and_tokenizer(exports, reference):
    ids, expected = reference
    path = exports["f32"]
    for got, want in zip(load_logits(path, ids), expected):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    gguf_tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    assert [gguf_tokenizer(text)["input_ids"] for text in SENTENCES] == ids


@pytest.mark.parametrize("outtype", ["f16", "q8_0"])
def test_reduced_precision_stays_close(exports, reference, outtype):
    ids, expected = reference
    # Tolerances relative to the logits' size (the random tiny model's are well under 1): f16 keeps ~11 bits of
    # mantissa (relative error ~5e-4 per weight), Q8_0 ~8 bits per 32-value block (~4e-3); errors add up over two
    # layers, so allow 1e-3 and 2e-2 of the largest logit (measured: ~3e-4 and ~1e-2).
    tolerance = {"f16": 1e-3, "q8_0": 2e-2}[outtype]
    agree = total = 0
    for got, want in zip(load_logits(exports[outtype], ids), expected):
        assert (got - want).abs().max() <= tolerance * want.abs().max()
        agree += (got.argmax(-1) == want.argmax(-1)).sum().item()
        total += len(want)
    assert agree >= 0.9 * total


def test_sizes_shrink_with_precision(exports):
    sizes = {outtype: path.stat().st_size for outtype, path in exports.items()}
    assert sizes["q8_0"] < sizes["f16"] < sizes["f32"]


def test_metadata_and_tensor_types(exports, tiny_model_dir):
    config = json.loads((tiny_model_dir / "config.json").read_text())
    reader = gguf.GGUFReader(exports["q8_0"])
    fields = reader.fields
    assert fields["general.architecture"].contents() == "llama"
    assert fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q8_0
    assert fields["llama.block_count"].contents() == config["num_hidden_layers"]
    assert fields["llama.attention.head_count_kv"].contents() == config["num_key_value_heads"]
    assert fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert fields["tokenizer.ggml.pre"].contents() == "gpt-2"  # the name llama.cpp's vocabulary loader accepts
    assert fields["tokenizer.ggml.add_bos_token"].contents() is True
    types = {tensor.name: tensor.tensor_type for tensor in reader.tensors}
    assert types["token_embd.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    assert "output.weight" in types  # the tiny model does not tie its embeddings
    assert not list(exports["q8_0"].parent.glob("*.partial"))


def test_unsupported_outtype_is_a_user_error(tiny_model_dir, tmp_path):
    with pytest.raises(UserError, match="q4_k"):
        write_gguf(tiny_model_dir, tmp_path / "model.gguf", "q4_k")
    assert not list(tmp_path.iterdir())


def test_unsupported_architecture_is_a_user_error(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    model_dir = tmp_path / "gpt2"
    config = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32)
    GPT2LMHeadModel(config).save_pretrained(model_dir)
    out_dir = tmp_path / "out"
    with pytest.raises(UserError, match="GPT2LMHeadModel"):
        write_gguf(model_dir, out_dir / "model.gguf")
    assert not out_dir.exists() or not list(out_dir.iterdir())


def test_interrupted_export_leaves_no_file(tiny_model_dir, tmp_path, monkeypatch):
    """Fail after the header is on disk (as a full disk would): neither the .gguf nor the .partial may remain."""
    def disk_full(self, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", disk_full)
    with pytest.raises(OSError):
        write_gguf(tiny_model_dir, tmp_path / "model.gguf")
    assert not list(tmp_path.iterdir())
