"""Smoke tests on a tiny Llama saved to disk: real loading, LoRA training, adapter save/reload, label scoring."""

from functools import partial

import lightning as L
import pytest
import torch
from peft import PeftModel
from torch.utils.data import DataLoader

from conftest import compose_config
from llmtune.data.prompts import PromptFormat, batch_tokens, encode_example, pad_batch, split_shared_prefix
from llmtune.data.prompts import shared_prefix_length
from llmtune.evaluation.scoring import classify, label_log_likelihoods
from llmtune.models.loader import load_base_model
from llmtune.models.logits import ChunkedCrossEntropy, labelled_logits
from llmtune.models.lora import add_lora
from llmtune.training.module import FineTuner, cosine_with_warmup, next_token_loss

FORMAT = PromptFormat("Classify the sentiment.", "{instruction}\n[{input}] =", " {answer}")
LABELS = ["positive", "negative", "neutral"]
ROWS = [{"id": str(i), "text": text, "label": label} for i, (text, label) in enumerate([
    ("Operating profit rose to EUR 4 mn", "positive"), ("Net sales fell by 12 percent", "negative"),
    ("The company is based in Espoo", "neutral"), ("Orders jumped in the quarter", "positive"),
    ("The plant will be closed", "negative"), ("The report is due in May", "neutral")] * 2)]


def tiny_peft(tiny_model_dir, method="instruct"):
    cfg = compose_config(["model=tiny", f"method={method}"])
    L.seed_everything(0, verbose=False)
    tokenizer, base = load_base_model(str(tiny_model_dir), cfg.model)
    return cfg, tokenizer, add_lora(base, cfg.model, cfg.method)


def fit(model, tokenizer, loss_on, tmp_path, steps=8):
    examples = [encode_example(tokenizer, FORMAT.prompt(r["text"]), FORMAT.answer(r["label"]), loss_on) for r in ROWS]
    loader = DataLoader(examples, batch_size=4, shuffle=True, collate_fn=lambda b: pad_batch(b, tokenizer.pad_token_id))
    module = FineTuner(model, optimizer=partial(torch.optim.AdamW, lr=5e-3),
                       scheduler=partial(cosine_with_warmup, warmup_ratio=0.1))
    trainer = L.Trainer(max_steps=steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path, accelerator="cpu",
                        callbacks=[L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="last")])
    trainer.fit(module, loader)
    return trainer


@pytest.mark.parametrize("method", ["instruct", "causal"])
def test_training_changes_lora_and_leaves_base_untouched(tiny_model_dir, tmp_path, method):
    cfg, tokenizer, model = tiny_peft(tiny_model_dir, method)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)

    fit(model, tokenizer, cfg.method.loss_on, tmp_path)

    after = dict(model.named_parameters())
    changed = {name for name in before if not torch.equal(before[name], after[name].detach())}
    assert {n for n in changed if "lora_B" in n}, "LoRA B matrices start at zero and must have moved"
    assert changed <= trainable, f"frozen weights changed: {sorted(changed - trainable)[:3]}"
    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert checkpoint["state_dict"] and all("lora_" in key for key in checkpoint["state_dict"])


def test_adapter_save_and_reload_gives_identical_predictions(tiny_model_dir, tmp_path):
    cfg, tokenizer, model = tiny_peft(tiny_model_dir)
    fit(model, tokenizer, "answer", tmp_path)
    trained = classify(model, tokenizer, ROWS, FORMAT, LABELS, batch_size=4)
    model.save_pretrained(tmp_path / "adapter")

    _, fresh_base = load_base_model(str(tiny_model_dir), cfg.model)
    reloaded = PeftModel.from_pretrained(fresh_base, tmp_path / "adapter")
    again = classify(reloaded, tokenizer, ROWS, FORMAT, LABELS, batch_size=4)
    assert [p["predicted"] for p in again] == [p["predicted"] for p in trained]
    for a, b in zip(again, trained):
        assert a["scores"] == pytest.approx(b["scores"], abs=1e-5)
    prompts, answers = [FORMAT.prompt(r["text"]) for r in ROWS], [FORMAT.answer(label) for label in LABELS]
    with model.disable_adapter():  # the adapter really changed the label log-likelihoods
        base = label_log_likelihoods(model, tokenizer, prompts, answers, batch_size=4)
    assert (label_log_likelihoods(model, tokenizer, prompts, answers, batch_size=4) - base).abs().max() > 0.1


def test_labelled_logits_match_the_full_forward(tiny_model_dir):
    _, tokenizer, model = tiny_peft(tiny_model_dir)
    model.eval()
    examples = [encode_example(tokenizer, FORMAT.prompt(r["text"]), FORMAT.answer(r["label"]), "answer")
                for r in ROWS[:3]]
    batch = pad_batch(examples, tokenizer.pad_token_id)
    with torch.no_grad():
        logits, targets, rows = labelled_logits(model, batch)
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected_positions = [(b, t) for b in range(3) for t in range(batch["labels"].shape[1] - 1)
                          if batch["labels"][b, t + 1] != -100]
    assert len(expected_positions) == len(targets)
    for i, (b, t) in enumerate(expected_positions):
        assert rows[i] == b and targets[i] == batch["labels"][b, t + 1]
        torch.testing.assert_close(logits[i], full[b, t].float(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("reuse_prefix", [True, False])
def test_label_scoring_single_and_multi_token_paths_agree_with_a_manual_sum(tiny_model_dir, reuse_prefix):
    _, tokenizer, model = tiny_peft(tiny_model_dir)
    prompts = [FORMAT.prompt(r["text"]) for r in ROWS[:4]]
    assert shared_prefix_length([tokenizer(p).input_ids for p in prompts]) > 3   # the instruction is shared
    multi = [" positive outlook", " negative"]   # at least one multi-token answer takes the per-label path
    assert len(tokenizer(multi[0], add_special_tokens=False).input_ids) > 1
    scores = label_log_likelihoods(model, tokenizer, prompts, multi, batch_size=3, reuse_prefix=reuse_prefix)
    with torch.no_grad():
        for i, prompt in enumerate(prompts):
            for j, answer in enumerate(multi):
                prompt_ids = tokenizer(prompt).input_ids
                answer_ids = tokenizer(answer, add_special_tokens=False).input_ids
                logp = torch.log_softmax(model(input_ids=torch.tensor([prompt_ids + answer_ids])).logits[0].float(), -1)
                manual = sum(logp[len(prompt_ids) - 1 + k, tok] for k, tok in enumerate(answer_ids))
                assert scores[i, j] == pytest.approx(float(manual), abs=1e-4)
    # Single-token answers use one forward per prompt; it must agree with the per-label path.
    single = [a for a in (" the", " of", " in", " to", " and")
              if len(tokenizer(a, add_special_tokens=False).input_ids) == 1]
    assert len(single) >= 2
    # Its LM head keeps only the answers' rows: log-probabilities normalised over the answers, so each row is the
    # full log-probabilities shifted by one constant and the softmax over the answers is the same.
    fast = label_log_likelihoods(model, tokenizer, prompts, single, batch_size=3, reuse_prefix=reuse_prefix)
    slow = label_log_likelihoods(model, tokenizer, prompts, single + [" positive outlook"], batch_size=3,
                                 reuse_prefix=reuse_prefix)[:, :-1]
    torch.testing.assert_close(fast.exp().sum(1), torch.ones(len(prompts)))
    shift = (slow - fast)[:, :1]
    assert (shift < -1e-3).all()  # the full vocabulary holds more than these answers
    torch.testing.assert_close(fast + shift, slow, atol=1e-4, rtol=1e-4)
    assert model.get_output_embeddings().out_features == len(tokenizer)  # the full head is back


@pytest.mark.parametrize("method", ["instruct", "causal"])
def test_shared_prefix_gives_the_same_loss_and_gradients(tiny_model_dir, method):
    cfg, tokenizer, model = tiny_peft(tiny_model_dir, method)
    model.train()
    examples = [encode_example(tokenizer, FORMAT.prompt(r["text"]), FORMAT.answer(r["label"]), cfg.method.loss_on)
                for r in ROWS[:5]]
    prefix, rest = split_shared_prefix(examples)
    if method == "causal":   # labels start right after BOS: nothing can be shared
        assert prefix == [] and rest == examples
        return
    assert len(prefix) > 3 and all(e["input_ids"][:len(prefix)] == prefix for e in examples)
    assert batch_tokens(pad_batch(rest, tokenizer.pad_token_id, prefix)) == sum(len(e["input_ids"]) for e in examples)

    def loss_and_grads(batch):
        model.zero_grad()
        loss = next_token_loss(model, batch)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain_loss, plain_grads = loss_and_grads(pad_batch(examples, tokenizer.pad_token_id))
    shared_loss, shared_grads = loss_and_grads(pad_batch(rest, tokenizer.pad_token_id, prefix))
    torch.testing.assert_close(shared_loss, plain_loss, atol=1e-5, rtol=1e-5)
    assert any(g.abs().sum() > 0 for g in plain_grads.values())
    for name, grad in plain_grads.items():
        torch.testing.assert_close(shared_grads[name], grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method,smoothing", [("instruct", 0.0), ("causal", 0.0), ("instruct", 0.1), ("causal", 0.3)])
def test_chunked_cross_entropy_gives_the_plain_loss_and_gradients(tiny_model_dir, method, smoothing, monkeypatch):
    """next_token_loss applies the frozen LM head a few positions at a time (ChunkedCrossEntropy); it must equal
    the full logits + F.cross_entropy (with its label_smoothing), in value and in every LoRA gradient, with and
    without autograd."""
    cfg, tokenizer, model = tiny_peft(tiny_model_dir, method)
    model.train()
    examples = [encode_example(tokenizer, FORMAT.prompt(r["text"]), FORMAT.answer(r["label"]), cfg.method.loss_on)
                for r in ROWS[:5]]
    batch = pad_batch(examples, tokenizer.pad_token_id)
    vocabulary = model.get_output_embeddings().weight.shape[0]
    monkeypatch.setattr(ChunkedCrossEntropy, "CHUNK_BYTES", 4 * vocabulary * 3)  # 3 positions a chunk: many chunks
    chunked_calls = []
    apply = ChunkedCrossEntropy.apply
    monkeypatch.setattr(ChunkedCrossEntropy, "apply", lambda *args: chunked_calls.append(1) or apply(*args))

    def plain_loss(model, batch):
        logits, targets, _ = labelled_logits(model, batch)
        return torch.nn.functional.cross_entropy(logits, targets, label_smoothing=smoothing)

    def chunked_loss(model, batch):
        return next_token_loss(model, batch, label_smoothing=smoothing)

    def loss_and_grads(loss_fn):
        model.zero_grad()
        loss = loss_fn(model, batch)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain, plain_grads = loss_and_grads(plain_loss)
    chunked, chunked_grads = loss_and_grads(chunked_loss)
    assert chunked_calls, "the chunked path was not taken"
    torch.testing.assert_close(chunked, plain, atol=1e-5, rtol=1e-5)
    assert any(g.abs().sum() > 0 for g in plain_grads.values())
    for name, grad in plain_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, atol=1e-5, rtol=1e-4)
    with torch.no_grad():  # validation: no gradient work, the same loss
        torch.testing.assert_close(chunked_loss(model, batch), plain, atol=1e-5, rtol=1e-5)
        if smoothing:  # the smoothing is applied: the unsmoothed loss is another number
            assert abs(float(next_token_loss(model, batch)) - float(plain)) > 1e-5
    assert model.get_output_embeddings().weight.shape[0] == vocabulary  # the LM head is back
