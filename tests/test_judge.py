"""The LLM judge of Q&A answers (eval.judge) over a real HTTP round trip on loopback: a small FastAPI app in a thread
plays a deterministic OpenAI-compatible judge, so every score, mean, distribution and disagreement is known by hand."""

import asyncio
import json
import logging
import re
import socket
from collections import Counter
from contextlib import contextmanager
from functools import cache
from pathlib import Path

import pytest
import yaml
from conftest import compose_config, serving
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from omegaconf import OmegaConf, open_dict

from llmtune.config import CONFIG_DIR, check_values
from llmtune.errors import UserError
from llmtune.evaluation.judge import CHATTY_LOGGERS, AnswerJudge, rouge_disagreement
from llmtune.report.compare import main as report
from llmtune.schema import schema_problems

PROMPT = yaml.safe_load((Path(CONFIG_DIR) / "judge_prompt" / "qa.yaml").read_text())
SLOW_S = 1.5  # a reply this late is past the client's timeout in test_a_request_timing_out_is_asked_again
FAST_RETRY = {"retry-after-ms": "5"}  # the openai client waits this long before retrying, not its 0.5 s backoff
WORD = re.compile(r"\w+")


def words(text: str) -> set[str]:
    return set(WORD.findall(text.lower()))


def fake_grade(question: str, reference: str, answer: str) -> tuple[int, int]:
    """The fake judge's rule: correctness 1 + the reference's words found in the answer (at most 5), relevance 5 when
    the answer shares a word with the question, else 1."""
    return min(5, 1 + len(words(reference) & words(answer))), 5 if words(question) & words(answer) else 1


class FakeJudge:
    """GET /v1/models and POST /v1/chat/completions of an OpenAI-compatible server, grading by fake_grade. Answers
    holding MALFORMED get a reply that is not JSON; RATELIMIT: one 429 first; SERVERERROR: one 500 first; SLOWLY: a
    first reply after SLOW_S seconds; DOWN: 500 every time. Every request is kept (path, Authorization header)."""

    def __init__(self, key: str | None = None):
        self.key, self.requests, self.disrupted = key, [], Counter()  # answer -> times disrupted
        self.temperatures = {}  # answer -> the temperature of each chat request about it
        fields = {name: f"(?P<{name}>.*)" for name in ("question", "reference", "answer")}
        parts = re.split(r"\{(question|reference|answer)\}", PROMPT["user"])
        self.pattern = re.compile("".join(fields[p] if i % 2 else re.escape(p) for i, p in enumerate(parts)), re.S)
        self.app = FastAPI()
        self.app.get("/v1/models")(self.models)
        self.app.post("/v1/chat/completions")(self.chat)

    def allowed(self, request: Request) -> bool:
        self.requests.append((request.url.path, request.headers.get("authorization")))
        return self.key is None or request.headers.get("authorization") == f"Bearer {self.key}"

    async def models(self, request: Request):
        if not self.allowed(request):
            return JSONResponse({"error": {"message": "bad key"}}, status_code=401)
        return {"object": "list", "data": [{"id": "fake-judge", "object": "model", "created": 0, "owned_by": "test"}]}

    async def chat(self, request: Request):
        if not self.allowed(request):
            return JSONResponse({"error": {"message": "bad key"}}, status_code=401)
        body = await request.json()
        asked = self.pattern.fullmatch(body["messages"][-1]["content"])
        question, reference, answer = asked["question"], asked["reference"], asked["answer"]
        self.temperatures.setdefault(answer, []).append(body["temperature"])
        if "SLOWLY" in answer and not self.disrupted[answer]:  # longer than the client waits: it retries
            self.disrupted[answer] += 1
            await asyncio.sleep(SLOW_S)
        for marker, status in (("RATELIMIT", 429), ("SERVERERROR", 500), ("DOWN", 500)):
            if marker in answer and (marker == "DOWN" or not self.disrupted[answer]):
                self.disrupted[answer] += 1
                return JSONResponse({"error": {"message": marker}}, status_code=status, headers=FAST_RETRY)
        correctness, relevance = fake_grade(question, reference, answer)
        verdict = {"correctness": correctness, "relevance": relevance, "reason": f"{correctness - 1} reference words"}
        content = "sure! correctness is high" if "MALFORMED" in answer else json.dumps(verdict)
        return {"id": "c", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": content}}],
                "usage": {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13}}

    def chats(self) -> int:
        return sum(path.endswith("/chat/completions") for path, _ in self.requests)


@contextmanager
def serving_judge(judge: FakeJudge):
    """The fake judge on a free loopback port in a background thread; yields its API base URL."""
    with serving(judge.app) as base_url:
        yield f"{base_url}/v1"


def free_port() -> int:
    """A loopback port nothing listens on (bound, then let go)."""
    with socket.create_server(("127.0.0.1", 0)) as sock:
        return sock.getsockname()[1]


@cache
def qa_config():
    """The Q&A run's config, composed once (composing takes seconds here); tests change copies of it."""
    return compose_config(["dataset=hr_demo"])


def judge_settings(url: str, **changes) -> dict:
    """eval.judge as the run composes it, pointed at url, two requests in flight."""
    settings = OmegaConf.to_container(qa_config().eval.judge, resolve=True)
    return {**settings, "url": url, "concurrency": 2, **changes}


# (question, reference, tuned answer, base answer) and the grades fake_grade gives them, worked out by hand.
ROWS = [
    ("how many leave days", "twenty days paid leave", "twenty days paid leave", "some leave"),
    ("who approves expenses", "the line manager approves", "manager approves the line", "the line manager signs"),
    ("where is the office", "office is in berlin", "MALFORMED reply please", "in berlin"),
    ("when do shifts start", "shifts start at nine", "at nine", "nine at"),
    ("how is travel booked", "through the travel portal", "through the travel portal RATELIMIT", "by email"),
    ("who cleans desks", "each employee cleans desks", "each employee cleans desks SERVERERROR",
     "each employee cleans desks"),
]
TUNED_GRADES = [(5, 5), (5, 5), None, (3, 1), (5, 5), (5, 5)]  # row 3: no reply ever matches the schema
BASE_GRADES = [(2, 5), (4, 1), (3, 1), (3, 1), (1, 1), (5, 5)]


def predictions(answer_column: int) -> list[dict]:
    return [{"id": f"q{i}", "text": row[0], "gold": row[1], "predicted": row[answer_column], "tokens": []}
            for i, row in enumerate(ROWS)]


def test_judge_scores_means_distributions_and_rouge_disagreement_over_http():
    fake = FakeJudge()
    with serving_judge(fake) as url:
        judge = AnswerJudge(judge_settings(url))
        tuned, base = predictions(2), predictions(3)
        tuned_metrics, base_metrics = judge.grade(tuned), judge.grade(base)

    assert [(p["judge"].get("correctness"), p["judge"].get("relevance")) for p in tuned] == [
        grades or (None, None) for grades in TUNED_GRADES]
    assert "not JSON" in tuned[2]["judge"]["invalid"] and tuned[0]["judge"]["reason"] == "4 reference words"
    # Means over the valid verdicts only: the malformed row is counted and left out.
    assert tuned_metrics["judge_correctness"] == pytest.approx(23 / 5)
    assert tuned_metrics["judge_relevance"] == pytest.approx(21 / 5)
    assert base_metrics["judge_correctness"] == pytest.approx(18 / 6)
    assert base_metrics["judge_relevance"] == pytest.approx(14 / 6)
    assert tuned_metrics["judge"]["distribution"] == {
        "correctness": {"1": 0, "2": 0, "3": 1, "4": 0, "5": 4}, "relevance": {"1": 1, "2": 0, "3": 0, "4": 0, "5": 4}}
    assert base_metrics["judge"]["distribution"] == {
        "correctness": {"1": 1, "2": 1, "3": 2, "4": 1, "5": 1}, "relevance": {"1": 4, "2": 0, "3": 0, "4": 0, "5": 2}}
    assert (tuned_metrics["judge"]["rows"], tuned_metrics["judge"]["valid"], tuned_metrics["judge"]["invalid"]) == (
        6, 5, 1)
    low, high = tuned_metrics["intervals"]["judge_correctness"]
    assert 3 <= low <= 23 / 5 <= high <= 5
    assert tuned_metrics["judge"]["model"] == "fake-judge" and tuned_metrics["judge"]["prompt_version"] == 1

    # The tally: the malformed row was asked `attempts` (3) times; the 429 and the 500 were retried by the client
    # (more HTTP exchanges at the server than completed requests in the tally).
    assert tuned_metrics["judge"]["endpoint"] == {"requests": 8, "failed_requests": 0, "invalid_replies": 3,
                                                  "prompt_tokens": 80, "completion_tokens": 24, "cost_usd": 0.0}
    assert base_metrics["judge"]["endpoint"]["requests"] == 6
    assert fake.disrupted == {ROWS[4][2]: 1, ROWS[5][2]: 1} and fake.chats() == 8 + 2 + 6
    # Greedy first; a greedy judge would repeat an invalid reply, so the attempts after it sample (retry_temperature).
    assert fake.temperatures[ROWS[2][2]] == [0.0, 0.7, 0.7] and fake.temperatures[ROWS[0][2]] == [0.0]

    # Base vs tuned on the same question: rows 1, 2, 4, 5, 6 have two verdicts; rows 4 and 6 are judge ties. Row 2:
    # the judge prefers the tuned answer (5 > 4), ROUGE-L the base one (the reference's words in order).
    records = [{**t, "base_predicted": b["predicted"], "base_judge": b["judge"]} for t, b in zip(tuned, base)]
    assert rouge_disagreement(records) == {"pairs": 5, "counted": 3, "ties_excluded": 2, "disagreements": 1,
                                           "disagreement_rate": pytest.approx(1 / 3)}


def test_only_the_first_max_rows_answers_are_judged():
    with serving_judge(FakeJudge()) as url:
        rows = predictions(3)
        metrics = AnswerJudge(judge_settings(url, max_rows=2)).grade(rows)
    assert [("judge" in row) for row in rows] == [True, True, False, False, False, False]
    assert metrics["judge"]["rows"] == 2 and metrics["judge_correctness"] == pytest.approx((2 + 4) / 2)


def test_a_request_timing_out_is_asked_again():
    fake = FakeJudge()
    with serving_judge(fake) as url:
        rows = predictions(3)[:1]
        rows[0]["predicted"] = "SLOWLY some leave"
        metrics = AnswerJudge(judge_settings(url, timeout_s=SLOW_S / 2)).grade(rows)
    assert rows[0]["judge"]["correctness"] == 2 and metrics["judge"]["endpoint"]["requests"] == 1
    assert fake.chats() == 2  # the one that timed out, and the client's retry


def test_an_endpoint_failing_midway_is_one_warning_and_no_judge_metrics(caplog):
    fake = FakeJudge()
    with serving_judge(fake) as url:
        judge = AnswerJudge(judge_settings(url, max_retries=1, concurrency=1))
        tuned = predictions(2)
        tuned[1]["predicted"] = "DOWN for good"
        with caplog.at_level(logging.INFO):
            assert judge.grade(tuned) is None
            asked = fake.chats()
            assert judge.grade(predictions(3)) is None  # the base model's answers: not asked, not warned again
    assert fake.chats() == asked and not any("judge" in row for row in tuned)
    warnings = [record for record in caplog.records if record.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "eval.judge: endpoint" in warnings[0].getMessage()
    assert "500" in warnings[0].getMessage()
    assert not [r for r in caplog.records if r.name.startswith(CHATTY_LOGGERS)]  # no per-request log lines


def test_judge_settings_are_validated_as_one_line_each():
    def problems(**settings):
        cfg = qa_config().copy()
        with open_dict(cfg):
            for key, value in settings.items():
                OmegaConf.update(cfg, f"eval.judge.{key}", value)
        return schema_problems(cfg)

    assert problems(url="http://127.0.0.1:8000/v1") == []
    # The prompt is part of the run's config, so the config Hydra saves with each run records which one graded it.
    assert OmegaConf.to_container(qa_config().eval.judge.prompt) == PROMPT and PROMPT["version"] == 1
    assert problems(url="localhost:8000") == [
        "eval.judge.url='localhost:8000' must be the API's base URL, starting with http:// or https:// "
        "(e.g. http://127.0.0.1:8000/v1), or null to turn the judge off"]
    assert problems(concurrency=0, timeout_s="abc", max_rows=0) == [
        "eval.judge.concurrency=0 must be greater than or equal to 1", "eval.judge.timeout_s='abc' must be a valid "
        "number", "eval.judge.max_rows=0 must be greater than or equal to 1"]
    assert problems(**{"prompt.user": "Grade {answer}"}) == [
        "eval.judge.prompt.user='Grade {answer}' must contain {question}, {reference} (replaced by the row's texts)"]
    assert problems(urls="http://x") == [
        "eval.judge.urls is not a setting of eval.judge; remove it (a typo of another eval.judge key?)"]
    # A key pasted where its variable's name goes is refused without being repeated.
    assert problems(api_key_env="sk-live-123") == [
        "eval.judge.api_key_env must name an environment variable (e.g. OPENAI_API_KEY), not hold the key: keys are "
        "read from the environment only"]


QA_RUN = ["model=tiny", "dataset=hr_demo", "dataset.split.train_rows=8", "dataset.split.val_rows=2",
          "dataset.split.test_rows=4", "eval.generation.max_new_tokens=6"]


def test_bad_judge_settings_stop_the_run_with_one_line():
    # What `llmtune` checks before the job starts; a UserError is one `llmtune: error:` line and exit 2 (errors.py).
    with pytest.raises(UserError) as refused:
        check_values([*QA_RUN, "eval.judge.url=localhost:8000", "eval.judge.concurrency=0"])
    message = str(refused.value)
    assert "\n" not in message and "eval.judge.url='localhost:8000'" in message
    assert "eval.judge.concurrency=0" in message


def qa_run(run_dir: Path, cache_dir: Path, tiny_model_dir: Path, *overrides: str) -> dict:
    """A tiny-model Q&A run, in this process (a subprocess spends half a minute importing), and its metrics.json."""
    from llmtune.run import run

    cfg = compose_config([*QA_RUN, *overrides], run_dir, cache_dir)
    with open_dict(cfg):
        cfg.model.path = str(tiny_model_dir)
    run(cfg)
    return json.loads((run_dir / "metrics.json").read_text())


def test_a_judged_qa_run_writes_scores_side_by_side_never_the_key(tmp_path, cache_dir, tiny_model_dir, monkeypatch,
                                                                   capsys):
    secret = "sk-judge-test-5f2a9c"
    monkeypatch.setenv("LLMTUNE_TEST_JUDGE_KEY", secret)  # a named variable: tracking does not know it
    fake = FakeJudge(key=secret)
    with serving_judge(fake) as url:
        summary = qa_run(tmp_path, cache_dir, tiny_model_dir, "trainer.max_epochs=1", f"eval.judge.url={url}",
                         "eval.judge.api_key_env=LLMTUNE_TEST_JUDGE_KEY")
    console = capsys.readouterr().out
    records = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]

    # Every test answer of both models graded by the fake judge's rule, sent with the key from the environment.
    assert len(records) == 4 and all(auth == f"Bearer {secret}" for _, auth in fake.requests)
    for record in records:
        for answer, verdict in ((record["predicted"], record["judge"]), (record["base_predicted"],
                                                                         record["base_judge"])):
            assert (verdict["correctness"], verdict["relevance"]) == fake_grade(record["text"], record["gold"], answer)
    for name, key in (("tuned", "judge"), ("base", "base_judge")):
        scores = [record[key]["correctness"] for record in records]
        assert summary["results"][name]["judge_correctness"] == pytest.approx(sum(scores) / 4)
        assert sum(summary["results"][name]["judge"]["distribution"]["correctness"].values()) == 4
    assert "judge_correctness" not in summary["results"]["val"]  # validation answers are not judged
    judged = summary["judge"]
    assert judged["model"] == "fake-judge" and judged["prompt_version"] == 1
    assert judged["endpoint"]["requests"] == 8 and judged["agreement_with_rougeL"]["pairs"] == 4
    assert summary["results"]["tuned"]["rougeL"] is not None  # every other metric as without a judge

    report_md = (tmp_path / "report.md").read_text()
    assert "| judge_correctness |" in report_md and "## LLM judge" in report_md and "Judge vs ROUGE-L" in report_md
    assert "judge_correctness" in console and "judge_relevance" in console  # the console table

    # The key is nowhere: not in any file of the run (metrics, predictions, report, logs) nor on the console.
    written = [path for path in tmp_path.rglob("*") if path.is_file()]
    assert written and not [path for path in written if secret.encode() in path.read_bytes()]
    assert secret not in console

    # `llmtune report` ranks by the judge, with the run's interval.
    report([str(tmp_path), "metric=judge_correctness"])
    comparison = (tmp_path / "comparison" / "report.md").read_text()
    assert "Runs ranked by test/judge_correctness" in comparison
    low, high = summary["results"]["tuned"]["intervals"]["judge_correctness"]
    assert f"{summary['results']['tuned']['judge_correctness']:.3f} [{low:.3f}, {high:.3f}]" in comparison


def test_an_unreachable_judge_is_one_warning_and_a_finished_run(tmp_path, cache_dir, tiny_model_dir, caplog):
    with caplog.at_level(logging.INFO):
        summary = qa_run(tmp_path, cache_dir, tiny_model_dir, "method=zeroshot",
                         f"eval.judge.url=http://127.0.0.1:{free_port()}/v1")
    warned = [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING
              and "judge" in record.getMessage()]
    assert len(warned) == 1 and "unreachable" in warned[0] and "\n" not in warned[0]
    assert not [record for record in caplog.records if record.name.startswith(CHATTY_LOGGERS)]  # no retry lines
    assert "judge" not in summary and "judge_correctness" not in summary["results"]["tuned"]
    assert summary["results"]["tuned"]["rougeL"] is not None and summary["results"]["base"]["bleu"] is not None
    records = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert records and not [record for record in records if {"judge", "base_judge"} & set(record)]
    assert "judge_correctness" not in (tmp_path / "report.md").read_text()
