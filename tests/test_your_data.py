"""A user's data as it comes: splits the data gives (a column, a file per part, a saved DatasetDict, a folder of
split files), label codes mapped to words, a text from several columns, long texts cut to a token budget, imbalanced
classes drawn in proportion; and each mistake in those settings is one line."""

import json
from collections import Counter

import pytest
from conftest import compose_config, run_llmtune
from omegaconf import open_dict

from llmtune.data.truncation import truncate_texts
from llmtune.errors import UserError
from llmtune.tasks import task_of


def write_rows(path, rows: list[dict]):
    """rows as CSV, JSONL or parquet by the file's suffix."""
    import pandas as pd

    frame = pd.DataFrame(rows)
    if path.suffix == ".jsonl":
        frame.to_json(path, orient="records", lines=True, force_ascii=False)
    elif path.suffix == ".parquet":
        frame.to_parquet(path)
    else:
        frame.to_csv(path, index=False)
    return path


def coded_rows(prefix: str, per_label: int, split: str | None = None) -> list[dict]:
    """per_label rows of each of the codes 0 and 1, texts unique per prefix."""
    return [{"id": f"{prefix}-{code}-{i}", "text": f"{prefix} review {i} of kind {code}", "label": code,
             **({"split": split} if split else {})} for code in (0, 1) for i in range(per_label)]


def task_for(overrides: list[str]):
    cfg = compose_config(["dataset=imdb", *([] if any("files" in o for o in overrides) else ["dataset.files=null"]),
                          "dataset.id_column=id", "dataset.split.train_per_class=null", "dataset.split.test_rows=null",
                          "dataset.split.val_per_class=null", "dataset.split.test_per_class=null", *overrides])
    return task_of(cfg)


def ids(rows: list[dict]) -> set[str]:
    return {row["id"] for row in rows}


def test_split_column_keeps_the_given_test_rows_and_draws_train_with_the_seed(tmp_path):
    rows = coded_rows("tr", 20, "train") + coded_rows("dv", 4, "dev") + coded_rows("te", 6, "test")
    path = write_rows(tmp_path / "data.csv", rows)
    options = [f"dataset.path={path}", "dataset.split.column=split", "dataset.split.names.validation=dev",
               "dataset.split.train_per_class=5"]
    task = task_for(options)
    splits = task.load_splits(seed=1)
    assert ids(splits["test"]) == {r["id"] for r in rows if r["split"] == "test"}   # the file's test rows, all
    assert ids(splits["val"]) == {r["id"] for r in rows if r["split"] == "dev"}
    assert Counter(r["label"] for r in splits["train"]) == {"negative": 5, "positive": 5}   # the budget, per class
    assert ids(splits["train"]) <= {r["id"] for r in rows if r["split"] == "train"}
    other_seed = task_for(options).load_splits(seed=2)
    assert ids(other_seed["train"]) != ids(splits["train"])     # the seed draws another training sample ...
    assert ids(other_seed["test"]) == ids(splits["test"])      # ... and never touches the given test split
    assert task.data_counts["split_mode"] == "split column"
    assert task.data_counts["class_counts"]["test"] == {"negative": 6, "positive": 6}


def test_files_per_part_in_mixed_formats_with_validation_carved_from_train(tmp_path):
    train = write_rows(tmp_path / "train.parquet", coded_rows("tr", 30))
    test = write_rows(tmp_path / "test.jsonl", coded_rows("te", 7))
    task = task_for([f"dataset.files={{train: {train}, test: {test}}}", "dataset.split.val_per_class=3",
                     "dataset.split.train_rows=20", "dataset.path=unused"])
    splits = task.load_splits(seed=0)
    assert len(splits["test"]) == 14 and ids(splits["test"]) == {f"te-{c}-{i}" for c in (0, 1) for i in range(7)}
    assert Counter(r["label"] for r in splits["val"]) == {"negative": 3, "positive": 3}
    assert len(splits["train"]) == 20 and not ids(splits["train"]) & ids(splits["val"])
    assert task.data_counts["split_mode"] == "files, validation carved from train"
    # A larger training budget keeps validation: it is carved first.
    more = task_for([f"dataset.files={{train: {train}, test: {test}}}", "dataset.split.val_per_class=3",
                     "dataset.split.train_rows=40", "dataset.path=unused"]).load_splits(seed=0)
    assert ids(more["val"]) == ids(splits["val"]) and len(more["train"]) == 40


def test_saved_dataset_dict_and_a_folder_of_split_files(tmp_path):
    import datasets

    parts = {"train": coded_rows("tr", 10), "test": coded_rows("te", 5), "unsupervised": coded_rows("un", 3)}
    datasets.DatasetDict({name: datasets.Dataset.from_list(rows) for name, rows in parts.items()}).save_to_disk(
        str(tmp_path / "saved"))
    task = task_for([f"dataset.path={tmp_path / 'saved'}", "dataset.split.test_rows=6"])
    splits = task.load_splits(seed=0)
    assert task.data_counts["split_mode"] == "saved DatasetDict, validation carved from train"
    assert Counter(r["label"] for r in splits["test"]) == {"negative": 3, "positive": 3}   # capped, stratified
    assert ids(splits["test"]) < {r["id"] for r in parts["test"]}
    assert ids(task_for([f"dataset.path={tmp_path / 'saved'}", "dataset.split.test_rows=6"]).load_splits(seed=9)[
        "test"]) == ids(splits["test"])                     # the cap is a fixed-seed sample: the same for every seed
    assert not any(r["id"].startswith("un") for part in splits.values() for r in part)

    folder = tmp_path / "folder"
    folder.mkdir()
    write_rows(folder / "train.csv", coded_rows("tr", 8))
    write_rows(folder / "test.csv", coded_rows("te", 4))
    folder_task = task_for([f"dataset.path={folder}"])
    assert len(folder_task.load_splits(seed=0)["test"]) == 8
    assert folder_task.data_counts["split_mode"] == "Hub dataset, validation carved from train"


def test_text_in_both_train_and_test_is_counted_and_removed_from_train_only(tmp_path):
    rows = coded_rows("tr", 10, "train") + coded_rows("te", 4, "test")
    rows[0]["text"] = rows[-1]["text"].upper()              # the same text, case aside, in train and in test
    path = write_rows(tmp_path / "data.csv", rows)
    task = task_for([f"dataset.path={path}", "dataset.split.column=split"])
    splits = task.load_splits(seed=0)
    assert task.data_counts["overlap_with_test"] == {"train": 1}
    assert len(splits["train"]) == 19 and len(splits["test"]) == 8
    kept = task_for([f"dataset.path={path}", "dataset.split.column=split", "dataset.duplicates=keep"])
    assert len(kept.load_splits(seed=0)["train"]) == 20 and kept.data_counts["overlap_with_test"] == {"train": 1}


def test_proportional_budgets_follow_the_class_balance():
    rows = [{"id": f"{label}{i}", "text": f"{label} {i}", "label": label}
            for label, n in (("a", 80), ("b", 15), ("c", 5)) for i in range(n)]
    from llmtune.data.splits import make_splits

    split = compose_config(["dataset=sentiment_demo", "dataset.split.train_per_class=null",
                            "dataset.split.val_per_class=null", "dataset.split.test_per_class=null",
                            "dataset.split.test_rows=20", "dataset.split.train_rows=60"]).dataset.split
    counts = {}
    splits = make_splits(rows, split, 3, ["a", "b", "c"], "label", True, counts)
    assert Counter(r["label"] for r in splits["test"]) == {"a": 16, "b": 3, "c": 1}
    assert Counter(r["label"] for r in splits["train"]) == {"a": 48, "b": 9, "c": 3}
    assert counts["split_mode"] == "drawn in proportion"


def test_a_validation_split_short_of_its_budget_is_warned_about(caplog):
    """A pool is drawn for test, then train; validation gets what is left, and selection on a few rows is noise."""
    from llmtune.data.splits import make_splits

    rows = [{"id": f"q{i}", "text": f"question {i}", "answer": f"answer {i}"} for i in range(50)]
    split = compose_config(["dataset=hr_demo", "dataset.split.test_rows=10", "dataset.split.train_rows=35",
                            "dataset.split.val_rows=20"]).dataset.split
    splits = make_splits(rows, split, 0, None, "answer", True, {})
    assert [len(splits[p]) for p in ("test", "train", "val")] == [10, 35, 5]
    assert "validation got 5 of its 20 rows" in caplog.text and "lower dataset.split.train_rows" in caplog.text
    caplog.clear()
    split.train_rows = 20
    assert len(make_splits(rows, split, 0, None, "answer", True, {})["val"]) == 20
    assert "validation got" not in caplog.text


def test_label_codes_are_scored_as_words_and_a_template_joins_columns(tmp_path):
    path = write_rows(tmp_path / "news.jsonl", [
        {"title": f"Title {i}", "body": f"body text {i}" if i % 5 else None, "label": i % 2} for i in range(40)])
    task = task_for([f"dataset.path={path}", "dataset.text_template='{title} — {body}'", "dataset.id_column=null",
                     "dataset.split.test_rows=10"])
    rows = task.load_splits(seed=0)["test"]
    assert task.labels == ["negative", "positive"]
    assert {(r["label"], r["raw_label"]) for r in rows} == {("negative", "0"), ("positive", "1")}
    texts = {r["text"] for part in task.load_splits(seed=0).values() for r in part}
    assert "Title 1 — body text 1" in texts and "Title 5 —" in texts   # an empty field leaves the rest


def test_long_texts_are_cut_to_the_token_budget_on_the_chosen_side(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    long_text = " ".join(f"word{i}" for i in range(3000))
    assert len(long_text) > 12_000
    short = "profit rose"

    def tokens(text):
        return len(tokenizer(text, add_special_tokens=False).input_ids)
    for side in ("head", "tail", "head+tail"):
        (cut, kept), n = truncate_texts([long_text, short], tokenizer, 64, side)
        assert n == 1 and kept == short and tokens(cut) <= 64 + 1   # +1: a re-joined boundary may split one token
        assert tokens(cut) >= 60
        assert cut.startswith("word0 ") == (side != "tail") and cut.endswith("word2999") == (side != "head")
        if side == "head+tail":
            assert " … " in cut
    assert truncate_texts([long_text], tokenizer, None, "head") == ([long_text], 0)


def tiny_run_on(path, cache_dir, train_per_class: int, test_per_class: int, *overrides: str):
    """A one-epoch tiny-model run on the file at path (dataset=imdb's reading settings), into run/ beside it."""
    run_dir = path.parent / "run"
    result = run_llmtune(["model=tiny", "dataset=imdb", f"dataset.path={path}", "dataset.files=null",
                          f"dataset.split.train_per_class={train_per_class}",
                          f"dataset.split.test_per_class={test_per_class}",
                          "dataset.split.test_rows=null", "dataset.split.val_per_class=0", "trainer.max_epochs=1",
                          f"hydra.run.dir={run_dir}", *overrides], cache_dir)
    assert result.returncode == 0, result.stderr[-2000:]
    return run_dir


def test_a_12000_character_row_trains_and_scores_with_its_cut_counted(tmp_path, cache_dir):
    rows = [{"text": f"short note {i} about {'gains' if i % 2 else 'losses'}", "label": i % 2} for i in range(24)]
    rows[3]["text"] = "losses " * 1800 + "in the end gains"            # 12,616 characters
    rows[4]["text"] = "gains " * 2000
    run_dir = tiny_run_on(write_rows(tmp_path / "long.csv", rows), cache_dir, 8, 4, "dataset.max_input_tokens=48")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    cut = metrics["data"]["truncated"]
    assert cut["max_input_tokens"] == 48 and cut["side"] == "head+tail"
    assert cut["train"] + cut["val"] + cut["test"] == 2
    assert "Texts cut to 48 tokens (head+tail)" in (run_dir / "report.md").read_text()
    predictions = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]
    assert {p["gold"] for p in predictions} == {"negative", "positive"}
    assert {p["predicted"] for p in predictions} <= {"negative", "positive"}
    assert "weighted_f1" in metrics["results"]["tuned"]


def test_test_metrics_are_broken_down_by_a_slice_column(tmp_path, cache_dir):
    """dataset.slice_column: accuracy and macro-F1 per value (numbers in numeric order), each agreeing with the rows
    of predictions.jsonl that carry that value, for base and tuned, and a table in the report."""
    rows = [{"text": f"note {i} about {'gains' if i % 2 else 'losses'}", "label": i % 2,
             "agreement": [50, 100, 66][i % 3] if i % 7 else None} for i in range(60)]
    path = write_rows(tmp_path / "sliced.csv", rows)
    run_dir = tiny_run_on(path, cache_dir, 10, 15, "dataset.slice_column=agreement")
    results = json.loads((run_dir / "metrics.json").read_text())["results"]
    predictions = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]
    tuned, base = results["tuned"]["slices"], results["base"]["slices"]
    assert list(tuned) == [v for v in ("50", "66", "100", "(empty)") if v in tuned] and "(empty)" in tuned
    assert sum(s["n"] for s in tuned.values()) == len(predictions) == 30 and tuned.keys() == base.keys()
    for value, scores in tuned.items():
        mine = [p for p in predictions if p["slice"] == value]
        assert scores["n"] == len(mine)
        assert scores["accuracy"] == pytest.approx(sum(p["predicted"] == p["gold"] for p in mine) / len(mine))
        assert base[value]["accuracy"] == pytest.approx(
            sum(p["base_predicted"] == p["gold"] for p in mine) / len(mine))
        low, high = scores["intervals"]["accuracy"]
        assert low <= scores["accuracy"] <= high
    report = (run_dir / "report.md").read_text()
    assert "By agreement (dataset.slice_column" in report and f"| 100 | {tuned['100']['n']} |" in report


@pytest.mark.parametrize("case,expected", [
    ("slice_column", "has no column for dataset.slice_column='source'"),
    ("split_value", "has split='holdout', which is none of train, validation, test"),
    ("missing_file", "dataset file not found"),
    ("unmapped_label", "has label 7, which is not in the keys of dataset.labels ['0', '1']"),
    ("template_column", "has no column for dataset.text_template's {subtitle}"),
    ("max_tokens", "dataset.max_input_tokens=0 must be greater than or equal to 1"),
])
def test_each_mistake_in_the_data_settings_is_one_line_before_any_model_loads(tmp_path, cache_dir, case, expected):
    rows = coded_rows("r", 6, "train") + coded_rows("t", 3, "test")
    options = {"slice_column": ["dataset.slice_column=source"],
               "split_value": ["dataset.split.column=split"],
               "missing_file": [f"dataset.files={{train: {tmp_path / 'nope.csv'}, test: {tmp_path / 'data.csv'}}}"],
               "unmapped_label": [],
               "template_column": ["dataset.text_template='{text} {subtitle}'"],
               "max_tokens": ["dataset.max_input_tokens=0"]}[case]
    if case == "split_value":
        rows[2]["split"] = "holdout"
    if case == "unmapped_label":
        rows[1]["label"] = 7
    path = write_rows(tmp_path / "data.csv", rows)
    result = run_llmtune(["model=tiny", "dataset=imdb", f"dataset.path={path}", "dataset.files=null",
                          f"hydra.run.dir={tmp_path / 'run'}", *options], cache_dir)
    errors = [line for line in result.stderr.splitlines() if line.startswith("llmtune: error:")]
    assert result.returncode == 2 and len(errors) == 1 and expected in errors[0], result.stderr[-1500:]
    assert "Traceback" not in result.stderr and not (tmp_path / "run" / "base_predictions.jsonl").exists()


def test_a_run_config_written_before_labels_could_be_a_mapping_still_loads():
    cfg = compose_config(["dataset=sentiment_demo"])
    with open_dict(cfg):
        cfg.dataset.labels = ["positive", "negative", "neutral"]
    assert task_of(cfg).labels == ["positive", "negative", "neutral"]
    with open_dict(cfg):
        cfg.dataset.labels = "positive"
    with pytest.raises(UserError, match="must be a list of label words or a mapping"):
        task_of(cfg).labels


def test_the_japanese_example_set_runs_end_to_end_with_bm25_demonstrations(tmp_path, cache_dir):
    """No whitespace between words, label codes scored as multi-token Japanese words, a headline+lead template:
    BM25 over character pairs still finds demonstrations of the row's own topic at least twice as often as chance (1 in 5)."""
    run_dir = tmp_path / "ja"
    result = run_llmtune(["model=tiny", "dataset=news_topics_ja", "rag=true", "retriever=bm25", "retriever.k=3",
                          "dataset.max_input_tokens=150", "trainer.max_epochs=1", "dataset.split.train_per_class=20",
                          "dataset.split.test_per_class=8", "dataset.split.val_per_class=0",
                          f"hydra.run.dir={run_dir}"], cache_dir)
    assert result.returncode == 0, result.stderr[-2000:]
    predictions = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]
    words = {"経済", "スポーツ", "テクノロジー", "政治", "文化"}
    assert len(predictions) == 40 and {p["gold"] for p in predictions} == words
    assert {p["predicted"] for p in predictions} <= words
    import csv

    from llmtune.data.loading import resource_path

    with open(resource_path("news_topics_ja.csv"), encoding="utf-8") as handle:
        source = {row["id"]: row for row in csv.DictReader(handle)}
    # The headline and the lead, from two columns, cut to 150 tokens keeping both ends.
    assert all(p["text"].startswith(source[p["id"]]["title"][:4]) and p["text"].endswith(source[p["id"]]["body"][-4:])
               for p in predictions)
    assert any(" … " in p["text"] for p in predictions)
    hits = [hit["label"] == p["gold"] for p in predictions for hit in p["retrieved"]]
    assert len(hits) > 100 and sum(hits) / len(hits) > 0.4     # twice chance; up to k=3 each
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["data"]["class_counts"]["test"] == {word: 8 for word in words}
    assert metrics["data"]["truncated"]["test"] > 0

    # predict reads the same two columns, cuts the same way and retrieves the same demonstrations: the run's labels.
    test_ids = [p["id"] for p in predictions]
    write_rows(tmp_path / "new.csv", [{k: source[i][k] for k in ("id", "title", "body")} for i in test_ids])
    out = tmp_path / "predicted.csv"
    result = run_llmtune(["predict", str(run_dir), f"input={tmp_path / 'new.csv'}", "output=csv", f"out={out}"],
                         cache_dir)
    assert result.returncode == 0, result.stderr[-2000:]
    with open(out, encoding="utf-8") as handle:
        predicted = {row["id"]: row for row in csv.DictReader(handle)}
    assert {i: predicted[i]["label"] for i in test_ids} == {p["id"]: p["predicted"] for p in predictions}
    codes = {"経済": "0", "スポーツ": "1", "テクノロジー": "2", "政治": "3", "文化": "4"}
    assert all(row["raw_label"] == codes[row["label"]] for row in predicted.values())
