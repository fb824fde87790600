"""Document Q&A: rows and splits, generated answers and their metrics, retrieved context in prompts, and whole
rag=false / rag=true runs on the tiny model with the shipped demo documents."""

import json

import pytest
from conftest import compose_config
from omegaconf import OmegaConf, open_dict

from llmtune.data.prompts import PromptFormat
from llmtune.data.qa import load_qa_rows
from llmtune.data.splits import make_splits
from llmtune.errors import UserError
from llmtune.evaluation.generation import qa_metrics, token_presence
from llmtune.rag.context import recall_at_k

QA_HEADER = "question,answer,doc,page,tokens_present,qa_type\n"


def qa_dataset(tmp_path, body: str, **overrides):
    (tmp_path / "qa.csv").write_text(QA_HEADER + body, encoding="utf-8")
    cfg = compose_config(["dataset=hr_policy_qa", f"dataset.path={tmp_path}", "dataset.page_column=page",
                          "dataset.keep=null", *[f"dataset.{k}={v}" for k, v in overrides.items()]]).dataset
    return cfg


def test_qa_rows_carry_question_answer_tokens_and_gold_location(tmp_path):
    cfg = qa_dataset(tmp_path, 'How long is probation?,Probation lasts 3 months.,HR_Policy.pdf,12,"[\'3 months\']",'
                               'free_form\nWho approves leave?,The manager.,HR_Policy.pdf,,,free_form\n'
                               ',No question here.,HR_Policy.pdf,3,,free_form\n')
    rows, _ = load_qa_rows(cfg)
    assert rows == [
        {"id": "row-1", "text": "How long is probation?", "answer": "Probation lasts 3 months.", "tokens": ["3 months"],
         "gold_source": "HR_Policy.pdf", "gold_page": 12},
        {"id": "row-2", "text": "Who approves leave?", "answer": "The manager.", "tokens": [],
         "gold_source": "HR_Policy.pdf", "gold_page": None}]  # the row without a question is skipped


def test_keep_filters_rows_by_column_values(tmp_path):
    cfg = qa_dataset(tmp_path, "Q1,A1,d.pdf,1,,free_form\nQ2,A2,d.pdf,1,,multi_choice\n")
    with open_dict(cfg):
        cfg.keep = {"qa_type": ["free_form"]}
    assert [r["text"] for r in load_qa_rows(cfg)[0]] == ["Q1"]


@pytest.mark.parametrize("body,expected", [
    ("Q,A,d.pdf,1,not a list,free_form\n", "is not a list of strings"),
    ("Q,A,d.pdf,1,,free_form\n", "has no column for dataset.question_column='prompt'"),
])
def test_bad_qa_files_are_one_line(tmp_path, body, expected):
    overrides = {"question_column": "prompt"} if "question_column" in expected else {}
    with pytest.raises(UserError, match=expected) as error:
        load_qa_rows(qa_dataset(tmp_path, body, **overrides))
    assert "\n" not in str(error.value)


def split_rows(rows, split_cfg, seed):
    return make_splits(rows, split_cfg, seed, None, "answer", False, {})


def test_split_is_seeded_disjoint_and_test_first():
    rows = [{"id": str(i), "text": f"q{i}", "answer": "a"} for i in range(50)]
    split_cfg = OmegaConf.create({"test_rows": 10, "train_rows": 30, "val_rows": 5})
    splits = split_rows(rows, split_cfg, seed=3)
    ids = {name: [r["id"] for r in part] for name, part in splits.items()}
    assert [len(ids[n]) for n in ("test", "train", "val")] == [10, 30, 5]
    assert not set(ids["test"]) & set(ids["train"]) and not set(ids["val"]) & set(ids["train"] + ids["test"])
    assert split_rows(rows, split_cfg, seed=3) == splits and split_rows(rows, split_cfg, seed=4) != splits
    # A larger training budget keeps the test rows.
    assert split_rows(rows, OmegaConf.create({"test_rows": 10, "train_rows": 40, "val_rows": None}), seed=3)["test"] == splits["test"]
    # Configs written before *_rows named the budgets test/train/val.
    assert split_rows(rows, OmegaConf.create({"test": 10, "train": 30, "val": 5}), seed=3) == splits
    with pytest.raises(UserError, match="train_rows=30 but only 20 rows are left"):
        split_rows(rows, OmegaConf.create({"test_rows": 30, "train_rows": 30, "val_rows": 0}), seed=3)


def test_token_presence_counts_rows_whose_answer_has_every_required_token():
    answers = ["Probation lasts 3 Months.", "It is 25 days", "No idea", "anything"]
    required = [["3 months"], ["25 days", "HR-12"], ["14 days"], []]
    assert token_presence(answers, required) == {"token_presence": pytest.approx(1 / 3), "n_token_rows": 3}
    assert token_presence(["x"], [[]]) == {"token_presence": None, "n_token_rows": 0}


def test_qa_metrics_score_identical_answers_perfectly_and_wrong_ones_low():
    rows = [{"gold": "Staff get 25 days of annual leave.", "tokens": ["25 days"]},
            {"gold": "Claims go to the finance team within 30 days.", "tokens": []}]
    perfect = qa_metrics([{**r, "predicted": r["gold"]} for r in rows])
    assert perfect["bleu"] == pytest.approx(100) and perfect["rougeL"] == pytest.approx(1)
    assert perfect["ngram_similarity"] == 1 and perfect["token_presence"] == 1 and perfect["n"] == 2
    wrong = qa_metrics([{**r, "predicted": "Blue whales are large."} for r in rows])
    assert wrong["rougeL"] < 0.2 and wrong["token_presence"] == 0


def test_recall_at_k_matches_documents_by_stem_and_pages_exactly():
    rows = [{"gold_source": "HR_Policy.pdf", "gold_page": 4, "retrieved": [{"source": "HR_Policy.txt", "page": 4}]},
            {"gold_source": "HR_Policy.pdf", "gold_page": 5, "retrieved": [{"source": "HR_Policy.txt", "page": 6}]},
            {"gold_source": "Guide.pdf", "gold_page": None, "retrieved": [{"source": "HR_Policy.txt", "page": 1}]},
            {"gold_source": None, "gold_page": None, "retrieved": []}]
    assert recall_at_k(rows) == {"document_recall": pytest.approx(2 / 3), "page_recall": 0.5, "n_gold_pages": 2}


def test_retrieved_context_follows_the_instruction_in_every_family_format():
    dataset = OmegaConf.create({"instruction": "Answer the question."})
    for name, expected in {
        "gemma3_270m": "Answer the question.\n\nContext: leave is 25 days\n[How much leave?] =",
        "gemma2b": "<start_of_turn>user\nAnswer the question.\n\nContext: leave is 25 days\n\nHow much leave?"
                   "<end_of_turn>\n<start_of_turn>model\n",
    }.items():
        prompt_format = PromptFormat.from_config(compose_config([f"model={name}"]).model, dataset)
        assert prompt_format.prompt("How much leave?", "Context: leave is 25 days") == expected
        assert prompt_format.prompt("How much leave?", "") == prompt_format.prompt("How much leave?")


SMALL_QA = ["model=tiny", "dataset=hr_demo", "trainer.max_epochs=1", "dataset.split.train_rows=12", "dataset.split.val_rows=2",
            "dataset.split.test_rows=4", "eval.generation.max_new_tokens=6", "retriever=bm25"]


def run_qa(tmp_path, cache_dir, tiny_model_dir, *overrides):
    from llmtune.run import run

    cfg = compose_config([*SMALL_QA, *overrides], tmp_path, cache_dir)
    with open_dict(cfg):
        cfg.model.path = str(tiny_model_dir)
    run(cfg)
    records = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    return json.loads((tmp_path / "metrics.json").read_text()), records, (tmp_path / "report.md").read_text()


def test_qa_run_without_rag_generates_answers_and_scores_them(tmp_path, cache_dir, tiny_model_dir):
    summary, records, report = run_qa(tmp_path, cache_dir, tiny_model_dir, "rag=false")
    assert summary["run"]["task"] == "qa" and summary["retrieval"] is None and summary["train"]["steps"] > 0
    assert set(summary["results"]) == {"base", "tuned", "val"}
    assert len(records) == 4 and all(set(r) >= {"id", "text", "gold", "predicted", "base_predicted"} for r in records)
    assert "retrieved" not in records[0]
    expected = qa_metrics(records)  # the run's metrics are those of the answers it wrote
    assert summary["results"]["tuned"]["rougeL"] == pytest.approx(expected["rougeL"])
    assert summary["logged"]["test/rougeL"] == pytest.approx(expected["rougeL"])
    assert "| rougeL |" in report and "Example answers" in report and "## Retrieval" not in report


def test_qa_test_metrics_are_broken_down_by_a_slice_column(tmp_path, cache_dir, tiny_model_dir):
    """dataset.slice_column on Q&A: ROUGE-L and BLEU per value, each those of the answers carrying that value."""
    summary, records, report = run_qa(tmp_path, cache_dir, tiny_model_dir, "rag=false", "dataset.slice_column=page",
                                      "dataset.split.test_rows=8")
    slices = summary["results"]["tuned"]["slices"]
    assert sum(s["n"] for s in slices.values()) == len(records) == 8
    pages = [v for v in slices if v != "(empty)"]
    assert pages == sorted(pages, key=float) and list(slices)[:len(pages)] == pages  # numbers by value, then words
    for value, scores in slices.items():
        mine = [r for r in records if r["slice"] == value]
        assert scores["n"] == len(mine) and scores["rougeL"] == pytest.approx(qa_metrics(mine)["rougeL"])
        assert set(scores) == {"n", "rougeL", "bleu", "intervals"} and "rougeL" in scores["intervals"]
    assert summary["results"]["base"]["slices"].keys() == slices.keys()
    assert "By page (dataset.slice_column" in report and "| page | rows | base rougeL | tuned rougeL |" in report


def test_qa_run_with_rag_puts_retrieved_chunks_in_the_prompts_and_reports_them(tmp_path, cache_dir, tiny_model_dir):
    summary, records, report = run_qa(tmp_path, cache_dir, tiny_model_dir, "rag=true", "retriever.k=2")
    retrieval = summary["retrieval"]
    assert retrieval["retriever"] == "bm25" and retrieval["k"] == 2 and retrieval["chunks"] > 10
    assert 0 <= retrieval["document_recall"] <= 1 and retrieval["n_gold_pages"] >= 0
    assert all(len(r["retrieved"]) == 2 and {"source", "page", "text"} <= set(r["retrieved"][0]) for r in records)
    assert "## Retrieval" in report and records[0]["retrieved"][0]["source"] in report


def test_rag_on_classification_shows_the_nearest_training_examples_never_the_row_itself(tmp_path, cache_dir,
                                                                                        tiny_model_dir):
    from llmtune.run import run

    cfg = compose_config(["model=tiny", "rag=true", "retriever.k=2", "trainer.max_epochs=1",  # dense, the default
                          "dataset.split.train_per_class=8", "dataset.split.val_per_class=2",
                          "dataset.split.test_per_class=3"], tmp_path, cache_dir)
    with open_dict(cfg):
        cfg.model.path = str(tiny_model_dir)
    run(cfg)
    summary = json.loads((tmp_path / "metrics.json").read_text())
    records = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert summary["retrieval"]["corpus"] == "training examples" and summary["retrieval"]["examples"] == 24
    assert all(len(r["retrieved"]) == 2 and {"id", "label", "text"} == set(r["retrieved"][0]) for r in records)
    assert not {r["id"] for r in records} & {hit["id"] for r in records for hit in r["retrieved"]}  # test rows
    assert "example " in (tmp_path / "report.md").read_text()


def test_a_training_row_never_retrieves_itself_as_a_demonstration(tmp_path):
    from llmtune.rag.context import add_example_context

    texts = ["Profit rose sharply", "Sales fell hard", "The office moved", "Profit rose again", "Sales fell again"]
    splits = {"train": [{"id": f"t{i}", "text": t, "label": "x"} for i, t in enumerate(texts)],
              "test": [{"id": "q", "text": "Profit rose sharply", "label": "x"}], "val": []}
    settings = add_example_context(splits, compose_config(["retriever=bm25", "retriever.k=2"]).retriever, tmp_path)
    assert settings["examples"] == 5
    for row in splits["train"]:
        hits = [hit["id"] for hit in row["retrieved"]]
        assert row["id"] not in hits and len(hits) <= 2  # BM25 returns only texts sharing a word
    assert splits["train"][0]["retrieved"][0]["id"] == "t3"  # its nearest other row: "Profit rose again"
    assert splits["test"][0]["retrieved"][0]["id"] == "t0"  # a test row may retrieve any training row
    assert splits["train"][0]["context"].startswith("Text: Profit rose again\nAnswer: x")


def test_report_across_qa_runs_ranks_by_rouge_l_without_mcnemar_or_confusion_matrices(tmp_path, cache_dir,
                                                                                      tiny_model_dir):
    from llmtune.report.compare import main as report

    for rag in ("false", "true"):
        run_qa(tmp_path / f"rag={rag}", cache_dir, tiny_model_dir, f"rag={rag}")
    report([str(tmp_path)])
    text = (tmp_path / "report.md").read_text()
    assert "Runs ranked by test/rougeL" in text and "confusion_matrices.png" not in text
    results = (tmp_path / "results.csv").read_text().splitlines()
    assert len(results) == 3 and all(line.split(",")[1] == "completed" for line in results[1:])
