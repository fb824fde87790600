"""method=classifier on tiny models saved to disk (a BERT encoder, a DistilBERT and the repo's tiny Llama): head size,
what trains, that it learns, the prediction format, adapter save/reload; plus the offline model sources."""

import json
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import compose_config
from peft import PeftModel
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForSequenceClassification,
    BertConfig,
    BertModel,
    DistilBertConfig,
    DistilBertModel,
    PreTrainedTokenizerFast,
)

from llmtune.methods.classification_head import (
    classifier_loaders,
    classify_with_head,
    encode_texts,
    head_loss,
    load_classifier,
    pad_examples,
)
from llmtune.errors import UserError
from llmtune.models.loader import prepare_model_dir
from llmtune.models.tiny import tokenizer_corpus
from llmtune.training.module import FineTuner, cosine_with_warmup

LABELS = ["positive", "negative", "neutral"]
# Separable by words: a tiny random model can learn it in a few dozen steps.
ROWS = [{"id": str(i), "text": text, "label": label} for i, (text, label) in enumerate([
    ("Operating profit rose to EUR 4 mn", "positive"), ("Net sales fell by 12 percent", "negative"),
    ("The company is based in Espoo", "neutral"), ("Orders jumped in the quarter", "positive"),
    ("The plant will be closed", "negative"), ("The report is due in May", "neutral")] * 2)]


def wordpiece_tokenizer() -> PreTrainedTokenizerFast:
    """A BERT-style tokenizer trained in code: lowercase WordPiece, [CLS] text [SEP], [PAD] = 0."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    wordpiece = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wordpiece.normalizer = normalizers.BertNormalizer(lowercase=True)
    wordpiece.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wordpiece.train_from_iterator(tokenizer_corpus(), trainers.WordPieceTrainer(vocab_size=400, special_tokens=specials))
    wordpiece.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[(t, wordpiece.token_to_id(t)) for t in ("[CLS]", "[SEP]")])
    return PreTrainedTokenizerFast(tokenizer_object=wordpiece, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")


def save_encoder(out_dir, model_class, config):
    """A bare encoder checkpoint (no head), as the real ones ship: loading it as a classifier adds a new head."""
    torch.manual_seed(0)
    tokenizer = wordpiece_tokenizer()
    model_class(config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory):
    # At BERT's default init (std 0.02) a random encoder barely mixes the words into [CLS]: learning stalls.
    return save_encoder(tmp_path_factory.mktemp("tiny-bert"), BertModel, lambda **ids: BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, initializer_range=0.1,
        **ids))


@pytest.fixture(scope="session")
def tiny_distilbert_dir(tmp_path_factory):
    return save_encoder(tmp_path_factory.mktemp("tiny-distilbert"), DistilBertModel, lambda **ids: DistilBertConfig(
        dim=32, n_layers=2, n_heads=4, hidden_dim=64, **ids))


@pytest.fixture(params=["bert", "llama"])
def family(request, tiny_bert_dir, tiny_model_dir):
    """(model overrides, folder): the BERT one uses model=minilm's YAML (its LoRA targets), the Llama model=tiny's."""
    return {"bert": (["model=minilm", f"model.path={tiny_bert_dir}"], tiny_bert_dir),
            "llama": (["model=tiny"], tiny_model_dir)}[request.param]


def load(family, *overrides, seed=0):
    model_overrides, model_dir = family
    cfg = compose_config([*model_overrides, "method=classifier", "trainer.batch_size=4", *overrides])
    L.seed_everything(seed, verbose=False)
    return cfg, *load_classifier(cfg.model, cfg.method, LABELS, str(model_dir))


def fit(cfg, tokenizer, model, tmp_path, steps=12, lr=5e-3):
    train_loader, _ = classifier_loaders(encode_texts(ROWS, tokenizer, LABELS, cfg.method.max_length), [],
                                         cfg.trainer, tokenizer, seed=0)
    module = FineTuner(model, optimizer=partial(torch.optim.AdamW, lr=lr),
                       scheduler=partial(cosine_with_warmup, warmup_ratio=0.1), loss=head_loss)
    trainer = L.Trainer(max_steps=steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path, accelerator="cpu",
                        callbacks=[L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="last")])
    trainer.fit(module, train_loader)
    return module


def toy_loss(tokenizer, model) -> float:
    model.eval()
    with torch.no_grad():
        return float(head_loss(model, pad_examples(encode_texts(ROWS, tokenizer, LABELS, 128), tokenizer)))


def test_the_head_gives_one_logit_per_label_and_only_lora_and_head_train(family):
    _, tokenizer, model = load(family)
    batch = pad_examples(encode_texts(ROWS[:3], tokenizer, LABELS, 128), tokenizer)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert logits.shape == (3, len(LABELS)) and model.config.id2label == dict(enumerate(LABELS))
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert any("lora_" in name for name in trainable) and any("modules_to_save" in name for name in trainable)
    assert all("lora_" in name or "modules_to_save" in name for name in trainable)


def test_lora_training_moves_lora_and_head_and_leaves_the_rest_bit_identical(family, tmp_path):
    cfg, tokenizer, model = load(family)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    fit(cfg, tokenizer, model, tmp_path)

    changed = {name for name, p in model.named_parameters() if not torch.equal(before[name], p.detach())}
    assert {n for n in changed if "lora_B" in n}, "LoRA B matrices start at zero and must have moved"
    assert {n for n in changed if "modules_to_save" in n}, "the new head must train"
    assert changed <= trainable, f"frozen weights changed: {sorted(changed - trainable)[:3]}"
    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert {key.removeprefix("model.") for key in checkpoint["state_dict"]} == trainable  # adapter + head only


def test_full_finetune_trains_every_weight_and_checkpoints_them_all(family, tmp_path):
    cfg, tokenizer, model = load(family, "method.full_finetune=true")
    assert not isinstance(model, PeftModel) and all(p.requires_grad for p in model.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    fit(cfg, tokenizer, model, tmp_path, steps=4, lr=1e-3)
    unchanged = [name for name, p in model.named_parameters() if torch.equal(before[name], p.detach())]
    assert not unchanged, f"weights that did not train: {unchanged[:3]}"
    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert len(checkpoint["state_dict"]) == len(before)


def test_the_loss_drops_on_a_learnable_toy_task(family, tmp_path):
    cfg, tokenizer, model = load(family)
    start = toy_loss(tokenizer, model)
    assert start == pytest.approx(torch.log(torch.tensor(3.0)).item(), abs=0.3)  # a fresh head: about chance
    module = fit(cfg, tokenizer, model, tmp_path, steps=30, lr=1e-2)
    end = toy_loss(tokenizer, model)
    assert end < 0.5 * start, f"loss {start:.3f} -> {end:.3f}"
    assert module.tokens_seen > 0


def test_classify_with_head_gives_the_classify_format_and_matches_a_manual_forward(family):
    _, tokenizer, model = load(family)
    with torch.no_grad():  # a fresh head's logits are nearly tied; spread them so float noise cannot flip an argmax
        trained_head(model).weight.mul_(20)
    predictions = classify_with_head(model, tokenizer, ROWS, LABELS, batch_size=5, max_length=128, desc="test")
    assert [p["id"] for p in predictions] == [r["id"] for r in ROWS]
    for row, prediction in zip(ROWS, predictions):
        assert set(prediction) == {"id", "text", "gold", "predicted", "scores", "logits"}
        assert (prediction["text"], prediction["gold"]) == (row["text"], row["label"])
        assert list(prediction["scores"]) == LABELS and sum(prediction["scores"].values()) == pytest.approx(1, abs=1e-4)
        with torch.no_grad():  # one row, no padding: what the batched, padded forward must reproduce
            logits = model(input_ids=torch.tensor([tokenizer(row["text"]).input_ids])).logits[0]
        manual = torch.softmax(logits, -1)
        assert prediction["predicted"] == LABELS[int(manual.argmax())]
        assert list(prediction["scores"].values()) == pytest.approx(manual.tolist(), abs=1e-4)
        assert list(prediction["logits"].values()) == pytest.approx(logits.tolist(), abs=1e-4)


def trained_head(model) -> torch.nn.Linear:
    """The head copy PEFT trains and saves (encoders call the head `classifier`, causal LMs `score`)."""
    wrapper = next(getattr(model.base_model.model, name) for name in ("classifier", "score")
                   if hasattr(model.base_model.model, name))
    return wrapper.modules_to_save["default"]


def test_adapter_save_and_reload_gives_identical_predictions(family, tmp_path):
    cfg, tokenizer, model = load(family)
    fit(cfg, tokenizer, model, tmp_path)
    trained = classify_with_head(model, tokenizer, ROWS, LABELS, batch_size=4, max_length=128)
    model.save_pretrained(tmp_path / "adapter")

    torch.manual_seed(123)  # a different random head: the adapter must bring the trained one
    fresh = AutoModelForSequenceClassification.from_pretrained(
        family[1], num_labels=len(LABELS), id2label=dict(enumerate(LABELS)), use_safetensors=True)
    fresh.config.pad_token_id = tokenizer.pad_token_id
    reloaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter")
    again = classify_with_head(reloaded, tokenizer, ROWS, LABELS, batch_size=4, max_length=128)
    assert [p["predicted"] for p in again] == [p["predicted"] for p in trained]
    for a, b in zip(again, trained):
        assert a["scores"] == pytest.approx(b["scores"], abs=1e-5)


def test_encoding_truncates_and_batches_cover_every_row_once(tiny_bert_dir):
    cfg, tokenizer, _ = load((["model=minilm", f"model.path={tiny_bert_dir}"], tiny_bert_dir))
    examples = encode_texts(ROWS, tokenizer, LABELS, max_length=5)
    assert all(len(e["input_ids"]) <= 5 for e in examples) and [e["label"] for e in examples] == [0, 1, 2] * 4
    loader, _ = classifier_loaders(examples, [], cfg.trainer, tokenizer, seed=0)
    labels = torch.cat([batch["labels"] for batch in loader])
    assert sorted(labels.tolist()) == sorted(e["label"] for e in examples)


def test_distilbert_yaml_targets_its_layers_and_trains_its_two_layer_head(tiny_distilbert_dir):
    cfg = compose_config(["model=distilbert", f"model.path={tiny_distilbert_dir}", "method=classifier"])
    _, model = load_classifier(cfg.model, cfg.method, LABELS, prepare_model_dir(cfg.model, "unused"))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    for layer in cfg.model.lora.target_modules:
        assert any(f"{layer}.lora_A" in name for name in trainable), layer
    assert {"pre_classifier", "classifier"} <= {name.split(".")[-4] for name in trainable if "modules_to_save" in name}


def test_minilm_comes_from_its_pypi_package_and_loads_as_a_lora_classifier():
    cfg = compose_config(["model=minilm", "method=classifier"])
    model_dir = prepare_model_dir(cfg.model, "unused")
    assert json.loads((Path(model_dir) / "config.json").read_text())["model_type"] == "bert"
    _, model = load_classifier(cfg.model, cfg.method, LABELS, model_dir)
    assert trained_head(model).out_features == len(LABELS)
    assert model.peft_config["default"].target_modules == {"query", "key", "value", "dense"}


def test_a_missing_package_or_an_offline_hub_model_is_one_line():
    cfg = compose_config(["model=minilm", "model.source.module=gt_no_such_model"])
    with pytest.raises(UserError, match="pip install gt-no-such-model"):
        prepare_model_dir(cfg.model, "unused")
    with pytest.raises(UserError, match="distilbert-base-uncased") as error:
        prepare_model_dir(compose_config(["model=distilbert"]).model, "unused")
    assert "\n" not in str(error.value)
