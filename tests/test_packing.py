"""Packing (trainer.packing): rows end to end in one sequence give the same loss and gradients as padded rows."""

import json

import pytest
import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig

from conftest import compose_config, run_llmtune
from llmtune.config import build_components
from llmtune.data.batching import PackedBatchSampler, Packs
from llmtune.data.prompts import IGNORE_INDEX, batch_tokens, encode_example, pack_batch, pad_batch
from llmtune.errors import UserError
from llmtune.training.module import next_token_loss
from test_training import FORMAT, ROWS, tiny_peft


def loss_and_grads(model, batch):
    model.zero_grad()
    loss = next_token_loss(model, batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_training_signal(model, examples, packs, pad_id):
    plain_loss, plain_grads = loss_and_grads(model, pad_batch(examples, pad_id))
    packed = pack_batch([[examples[i] for i in pack] for pack in packs], pad_id)
    assert packed["input_ids"].shape[0] == len(packs) < len(examples)
    packed_loss, packed_grads = loss_and_grads(model, packed)
    torch.testing.assert_close(packed_loss, plain_loss, atol=1e-5, rtol=1e-5)
    assert plain_grads and plain_grads.keys() == packed_grads.keys()
    assert any(g.abs().sum() > 0 for g in plain_grads.values())
    for name, grad in plain_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, atol=1e-5, rtol=1e-4)


def test_pack_batch_restarts_positions_and_drops_the_label_across_examples():
    a = {"input_ids": [1, 5, 6], "labels": [1, 5, 6]}
    b = {"input_ids": [1, 7], "labels": [1, 7]}
    batch = pack_batch([[a, b], [b]], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 5, 6, 1, 7], [1, 7, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]]
    # b's first token is not predicted from a's last; padding carries no label
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 5, 6, IGNORE_INDEX, 7], [IGNORE_INDEX, 7] + [IGNORE_INDEX] * 3]
    assert batch_tokens(batch) == 7


def test_causal_lora_loss_and_gradients_are_the_same_packed(tiny_model_dir):
    cfg, tokenizer, model = tiny_peft(tiny_model_dir, "causal")
    model.train()
    examples = [encode_example(tokenizer, FORMAT.prompt(r["text"]), FORMAT.answer(r["label"]), "all")
                for r in ROWS[:6]]
    assert_same_training_signal(model, examples, [(0, 3, 4), (1, 2), (5,)], tokenizer.pad_token_id)


def test_gemma3_sliding_window_stays_within_each_packed_example():
    """Gemma 3 mixes sliding-window and full attention layers; a window shorter than the examples makes the
    sliding layers' mask matter, and it must restart with every example too."""
    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=4,
                              layer_types=["sliding_attention", "full_attention"], max_position_embeddings=128,
                              pad_token_id=0)
    model = Gemma3ForCausalLM(config).train()
    examples = [{"input_ids": ids, "labels": list(ids)}
                for ids in ([2] + torch.randint(3, 64, (n,)).tolist() for n in (9, 6, 12, 4))]
    assert_same_training_signal(model, examples, [(0, 1), (2, 3)], pad_id=0)


def test_packed_sampler_packs_every_row_once_within_the_length():
    lengths = [30, 70, 12, 55, 90, 41, 8, 64, 33, 150, 20, 47]
    sampler = PackedBatchSampler(lengths, batch_size=2, pack_length=100, seed=3)
    epochs = [list(sampler), list(sampler)]
    for batches in epochs:
        packs = [pack for batch in batches for pack in batch]
        assert sorted(i for pack in packs for i in pack) == list(range(len(lengths)))
        assert all(sum(lengths[i] for i in pack) <= 100 or len(pack) == 1 for pack in packs)
        assert len(batches) == len(sampler) and all(len(batch) <= 2 for batch in batches)
        # first-fit-decreasing on these lengths (sum 620) needs 8 packs of 100, the 150-token row alone in one
        assert len(packs) < len(lengths) and [9] in [list(p) for p in packs]
    assert epochs[0] != epochs[1]                                       # reshuffled each epoch
    assert list(PackedBatchSampler(lengths, 2, 100, seed=3)) == epochs[0]  # and seeded
    assert Packs(["a", "b", "c"])[(2, 0)] == ["c", "a"]


def test_packing_config_is_checked():
    build_components(compose_config(["method=causal", "trainer.packing=256"]))
    bad = ((["method=instruct", "trainer.packing=256"], "trainer.share_prefix=false"),
           (["method=causal", "trainer.packing=0"], "must be a token count"),
           (["method=classifier", "model=distilbert", "trainer.packing=256"], "classification head"))
    for overrides, problem in bad:
        with pytest.raises(UserError, match=problem):
            build_components(compose_config(overrides))
    build_components(compose_config(["method=instruct", "trainer.packing=256", "trainer.share_prefix=false"]))


def test_a_packed_causal_run_trains_and_reports(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    result = run_llmtune(["model=tiny", "method=causal", "trainer.packing=1024", "trainer.batch_size=2",
                          "trainer.max_epochs=1", "dataset.split.train_per_class=10", "dataset.split.test_per_class=5",
                          "eval.baseline=false", f"hydra.run.dir={run_dir}"], cache_dir)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((run_dir / "metrics.json").read_text())
    # 30 rows of ~150 tiny-tokenizer tokens fit 6 to a 1024-token pack: 5 or 6 packs, 3 steps of 2 (unpacked: 15)
    assert 2 <= summary["train"]["steps"] <= 4
    assert summary["train"]["tokens"] > 30 * 20 and (run_dir / "adapter" / "adapter_config.json").is_file()
