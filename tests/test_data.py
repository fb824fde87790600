"""Loading, splitting and encoding of rows; every bad input is one UserError."""

from collections import Counter

import pytest

from conftest import compose_config
from llmtune.data.loading import load_rows
from llmtune.data.splits import make_splits
from llmtune.data.prompts import IGNORE_INDEX, PromptFormat, encode_example, pad_batch
from llmtune.errors import UserError


def dataset_cfg(path, **overrides):
    cfg = compose_config(["dataset=financial_phrasebank", f"dataset.path={path}"]
                         + [f"dataset.{k}={v}" for k, v in overrides.items()])
    return cfg.dataset


def write_csv(path, rows, header="text,label"):
    path.write_text(header + "\n" + "\n".join(rows) + ("\n" if rows else ""), encoding="utf-8")
    return path


def test_shipped_demo_loads_balanced():
    rows, given_by = load_rows(compose_config([]).dataset)
    assert given_by is None
    assert Counter(r["label"] for r in rows) == {"positive": 120, "negative": 120, "neutral": 120}
    assert len({r["id"] for r in rows}) == 360


def split_per_class(rows, labels, split, seed):
    return make_splits(rows, split, seed, labels, "label", False, {})


def test_split_is_stratified_seeded_and_test_independent_of_train_size():
    rows = [{"id": f"{label}-{i}", "text": f"t{i}", "label": label} for label in "abc" for i in range(20)]
    split = compose_config(["dataset=sentiment_demo"]).dataset.split
    split.train_per_class, split.test_per_class, split.val_per_class = 8, 5, 3
    first = split_per_class(rows, list("abc"), split, seed=1)
    assert {k: len(v) for k, v in first.items()} == {"train": 24, "val": 9, "test": 15}
    assert Counter(r["label"] for r in first["test"]) == {"a": 5, "b": 5, "c": 5}
    ids = {k: {r["id"] for r in v} for k, v in first.items()}
    assert not (ids["train"] & ids["test"]) and not (ids["val"] & ids["test"]) and not (ids["train"] & ids["val"])
    assert split_per_class(rows, list("abc"), split, seed=1) == first          # same seed, same split
    assert {r["id"] for r in split_per_class(rows, list("abc"), split, seed=2)["test"]} != ids["test"]
    split.train_per_class = 12
    assert {r["id"] for r in split_per_class(rows, list("abc"), split, seed=1)["test"]} == ids["test"]


def test_split_asking_for_more_rows_than_a_class_has(tmp_path):
    rows = [{"id": str(i), "text": "x", "label": label} for i, label in enumerate("aab")]
    split = compose_config([]).dataset.split
    split.train_per_class, split.test_per_class = 1, 1
    with pytest.raises(UserError, match="label 'b' has 0 rows left but dataset.split.train_per_class asks for 1"):
        split_per_class(rows, ["a", "b"], split, seed=0)


@pytest.mark.parametrize("case,expected", [
    ("missing", "dataset file not found"),
    ("no_column", "has no column for dataset.text_column='text'"),
    ("empty", "has no rows"),
    ("unknown_label", "label 'bullish', which is not in dataset.labels"),
])
def test_bad_dataset_files_raise_one_line(tmp_path, case, expected):
    path = tmp_path / "data.csv"
    if case == "no_column":
        write_csv(path, ["good,positive"], header="sentence,label")
    elif case == "empty":
        write_csv(path, [])
    elif case == "unknown_label":
        write_csv(path, ["up we go,positive", "to the moon,bullish"])
    with pytest.raises(UserError, match=expected) as error:
        load_rows(dataset_cfg(path))
    assert "\n" not in str(error.value)


def test_jsonl_and_headerless_csv(tmp_path):
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('{"text": "profit rose", "label": "positive"}\n{"text": "loss", "label": "negative"}\n')
    assert [r["label"] for r in load_rows(dataset_cfg(jsonl))[0]] == ["positive", "negative"]
    headerless = tmp_path / "all-data.csv"
    headerless.write_text("neutral,The plant is in Oulu .\npositive,Sales rose .\n", encoding="latin-1")
    rows, _ = load_rows(dataset_cfg(headerless, column_names="[label,text]", encoding="latin-1"))
    assert rows[0] == {"id": "row-1", "text": "The plant is in Oulu .", "label": "neutral", "raw_label": "neutral"}


def test_loss_mask_of_each_method(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    fmt = PromptFormat("Classify.", "{instruction}\n[{input}] =", " {answer}")
    prompt, answer = fmt.prompt("Sales rose"), fmt.answer("positive")
    assert (prompt, answer) == ("Classify.\n[Sales rose] =", " positive")
    prompt_ids = tokenizer(prompt).input_ids
    answer_ids = tokenizer(answer, add_special_tokens=False).input_ids
    assert prompt_ids[0] == tokenizer.bos_token_id

    instruct = encode_example(tokenizer, prompt, answer, loss_on="answer")
    assert instruct["input_ids"] == prompt_ids + answer_ids
    assert instruct["labels"] == [IGNORE_INDEX] * len(prompt_ids) + answer_ids

    causal = encode_example(tokenizer, prompt, answer, loss_on="all")
    assert causal["labels"] == causal["input_ids"] == prompt_ids + answer_ids

    batch = pad_batch([instruct, {"input_ids": [5, 6], "labels": [5, 6]}], pad_id=tokenizer.pad_token_id)
    width = len(instruct["input_ids"])
    assert batch["attention_mask"][1].tolist() == [1, 1] + [0] * (width - 2)
    assert batch["labels"][1, 2:].eq(IGNORE_INDEX).all()


def test_length_pools_cover_every_row_once_with_less_padding_and_a_seeded_order():
    from llmtune.data.batching import LengthPoolBatchSampler

    lengths = [(i * 37) % 61 + 5 for i in range(203)]
    sampler = LengthPoolBatchSampler(lengths, batch_size=8, pool_batches=4, seed=3)
    epoch_one, epoch_two = list(sampler), list(sampler)
    assert len(epoch_one) == len(sampler) == 6 * 4 + 2        # 6 pools of 32 rows in 4 batches, then 11 rows in 2
    assert sorted(i for batch in epoch_one for i in batch) == list(range(203))
    assert epoch_one != epoch_two                              # reshuffled every epoch ...
    assert list(LengthPoolBatchSampler(lengths, 8, 4, seed=3)) == epoch_one   # ... reproducibly from the seed

    def padded(batches):  # tokens computed when every batch pads to its longest row
        return sum(max(lengths[i] for i in b) * len(b) for b in batches)
    plain = list(LengthPoolBatchSampler(lengths, 8, pool_batches=1, seed=3))
    assert padded(epoch_one) < 0.8 * padded(plain)
