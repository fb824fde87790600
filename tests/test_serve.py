"""`llmtune serve`: the real server (uvicorn on a loopback port) answering a real HTTP client, on the tiny run."""

import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
from conftest import run_llmtune, serving, wait_until

from llmtune.inference import load_run
from llmtune.serve import create_app

REPO = Path(__file__).resolve().parents[1]
MAX_NEW_TOKENS = 16
MAX_BODY_BYTES = 8192
MAX_PROMPT_TOKENS = 256  # the tiny model has 512 positions


@pytest.fixture(scope="module")
def loaded(tiny_run):
    return load_run(tiny_run)


@contextmanager
def running(app):
    """An httpx client on a uvicorn server for app in a background thread, stopped on leaving."""
    with serving(app) as base_url, httpx.Client(base_url=base_url, timeout=60) as http:
        yield http


@pytest.fixture(scope="module")
def client(loaded):
    """The server for the tests that need no special model, shared by the module."""
    with running(create_app(loaded, max_body_bytes=MAX_BODY_BYTES, max_new_tokens=MAX_NEW_TOKENS,
                            max_prompt_tokens=MAX_PROMPT_TOKENS)) as http:
        yield http


class Gate:
    """The run with a model that is busy until the test opens the gate: classify_prompts blocks on its first call
    until opened, and every call's number of prompts is kept (a stand-in for a slow model, without the sleep)."""

    def __init__(self, loaded, opened: bool = False):
        self.run = replace(loaded)  # the same weights; the test's classify_prompts on this copy only
        self.entered, self.opened, self.calls = threading.Event(), threading.Event(), []
        if opened:
            self.opened.set()

        def classify_prompts(prompts, *args, **kwargs):
            self.calls.append(len(prompts))
            self.entered.set()
            assert self.opened.wait(30), "the test never opened the gate"
            return loaded.classify_prompts(prompts, *args, **kwargs)

        self.run.classify_prompts = classify_prompts


def post_raw(client, path: str, body: str) -> httpx.Response:
    """body as given: httpx's json= cannot encode a lone surrogate, which is the point of sending one."""
    return client.post(path, content=body.encode(), headers={"content-type": "application/json"})


def assert_error(response: httpx.Response, status: int, message_part: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "code"} and message_part in error["message"], error


def test_models(client, loaded):
    body = client.get("/v1/models").json()
    assert body["object"] == "list" and [m["id"] for m in body["data"]] == [loaded.name]


def test_classify_string_and_list(client, loaded):
    texts = ["Profit rose sharply in the quarter.", "The company cut its forecast.", "Sales were flat."]
    one = client.post("/v1/classify", json={"input": texts[0]})
    assert one.status_code == 200, one.text
    assert one.json()["model"] == loaded.name and len(one.json()["data"]) == 1

    many = client.post("/v1/classify", json={"input": texts}).json()["data"]
    assert [row["index"] for row in many] == [0, 1, 2]
    direct = loaded.classify(texts)
    assert [row["label"] for row in many] == [row["label"] for row in direct]
    assert many[0]["label"] == one.json()["data"][0]["label"]
    for row in many:
        assert row["label"] in loaded.labels and set(row["scores"]) == set(loaded.labels)
        assert sum(row["scores"].values()) == pytest.approx(1.0, abs=1e-3)
        assert row["confidence"] == max(row["scores"].values())


def test_chat_completion_shape_usage_and_greedy_repeat(client, loaded):
    request = {"model": loaded.name, "max_tokens": 8,
               "messages": [{"role": "system", "content": "Classify the sentiment."},
                            {"role": "user", "content": "Profit rose sharply."}]}
    first = client.post("/v1/chat/completions", json=request)
    assert first.status_code == 200, first.text
    body = first.json()
    assert body["object"] == "chat.completion" and body["model"] == loaded.name and body["id"]
    assert isinstance(body["created"], int)
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert 0 < usage["completion_tokens"] <= 8 and usage["prompt_tokens"] > 0
    # Greedy by default: the same request gives the same text.
    assert client.post("/v1/chat/completions", json=request).json()["choices"][0] == choice


def test_completion(client, loaded):
    response = client.post("/v1/completions", json={"prompt": "Text: profit rose\nAnswer:", "max_tokens": 4,
                                                     "stop": "\n"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "text_completion" and "\n" not in body["choices"][0]["text"]
    assert body["usage"]["completion_tokens"] <= 4


def test_malformed_json_and_missing_fields(client):
    broken = client.post("/v1/chat/completions", content=b'{"messages": [',
                         headers={"content-type": "application/json"})
    assert_error(broken, 400, "not valid JSON")
    assert_error(client.post("/v1/chat/completions", json={"max_tokens": 4}), 400, "messages")
    assert_error(client.post("/v1/chat/completions", json={"messages": [{"role": "robot", "content": "hi"}]}),
                 400, "messages.0.role")
    assert_error(client.post("/v1/classify", json={"input": []}), 400, "1 to 256")
    assert_error(client.get("/v1/nowhere"), 404, "Not Found")


def test_limits(client):
    # Over max_body_bytes: refused from the Content-Length header, and from the bytes of a chunked body.
    assert_error(client.post("/v1/completions", json={"prompt": "x" * MAX_BODY_BYTES}), 413, "max_body_bytes")
    chunks = (b'{"prompt": "' + b"x" * 1000 if i == 0 else b"x" * 1000 for i in range(10))
    assert_error(client.post("/v1/completions", content=chunks), 413, "max_body_bytes")
    long_prompt = "profit " * 600  # fits the body limit, not the token limit
    assert_error(client.post("/v1/completions", json={"prompt": long_prompt}), 400, "max_prompt_tokens")
    assert_error(client.post("/v1/classify", json={"input": long_prompt}), 400, "max_prompt_tokens")
    messages = [{"role": "user", "content": "hi"}]
    assert_error(client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": MAX_NEW_TOKENS + 1}),
                 400, f"limit of {MAX_NEW_TOKENS}")
    assert_error(client.post("/v1/chat/completions", json={"messages": messages, "stream": True}), 400,
                 "streaming is not supported")
    assert_error(client.post("/v1/chat/completions", json={"messages": messages, "model": "gpt-4o"}), 404,
                 "not served here")
    assert_error(client.post("/v1/classify", json={"input": ["a"] * 257}), 400, "1 to 256")


@pytest.mark.parametrize("path,body,field", [
    ("/v1/classify", r'{"input": "profit \ud800 rose"}', "input: not valid Unicode"),
    ("/v1/classify", r'{"input": ["fine", "\udfff"]}', "input: text 1: not valid Unicode"),
    ("/v1/classify", r'{"input": "fine", "model": "\ud800"}', "model: not valid Unicode"),
    ("/v1/completions", r'{"prompt": "\ud800"}', "prompt: not valid Unicode"),
    ("/v1/completions", r'{"prompt": "x", "stop": ["\ud800"]}', "stop: text 0: not valid Unicode"),
    ("/v1/chat/completions", r'{"messages": [{"role": "user", "content": "\ud800"}]}',
     "messages.0.content: not valid Unicode"),
])
def test_lone_surrogate_is_400(client, path, body, field):
    assert_error(post_raw(client, path, body), 400, field)


def test_empty_classify_input_is_400_naming_it(client):
    assert_error(client.post("/v1/classify", json={"input": ""}), 400, "input 0 is empty")
    assert_error(client.post("/v1/classify", json={"input": ["Profit rose.", " \n\t", ""]}), 400,
                 "input 1 is empty or whitespace only (and 1 more)")
    assert client.post("/v1/classify", json={"input": "Profit rose."}).status_code == 200  # still answering


def test_openapi_is_off_with_the_docs(client):
    for path in ("/openapi.json", "/docs", "/redoc"):
        assert_error(client.get(path), 404, "Not Found")


def test_full_queue_is_429_with_retry_after_then_serves_again(loaded):
    gate = Gate(loaded)
    app = create_app(gate.run, max_queue=1)
    with running(app) as http, ThreadPoolExecutor(2) as pool:
        on_model = pool.submit(http.post, "/v1/classify", json={"input": "Profit rose."})
        assert gate.entered.wait(30)
        waiting = pool.submit(http.post, "/v1/classify", json={"input": "Sales were flat."})
        wait_until(lambda: len(app.state.worker.waiting) == 1)
        refused = http.post("/v1/classify", json={"input": "The company cut its forecast."})
        assert_error(refused, 429, "max_queue=1")
        assert refused.json()["error"]["code"] == "queue_full" and int(refused.headers["Retry-After"]) >= 1
        gate.opened.set()
        assert on_model.result(timeout=60).status_code == 200 and waiting.result(timeout=60).status_code == 200
        assert http.post("/v1/classify", json={"input": "The company cut its forecast."}).status_code == 200


def test_request_timeout_is_504_and_a_timed_out_request_never_runs(loaded):
    gate = Gate(loaded)
    app = create_app(gate.run, request_timeout_s=0.5)
    with running(app) as http, ThreadPoolExecutor(1) as pool:
        on_model = pool.submit(http.post, "/v1/classify", json={"input": "Profit rose."})
        assert gate.entered.wait(30)
        assert_error(http.post("/v1/classify", json={"input": "Sales were flat."}), 504, "request_timeout_s")
        assert_error(on_model.result(timeout=30), 504, "request_timeout_s")
        gate.opened.set()
        assert http.post("/v1/classify", json={"input": "Net sales fell."}).status_code == 200
    assert gate.calls == [1, 1]  # the request on the model and the last one: the queued one was dropped unscored


BATCH_REQUESTS = [["Profit rose sharply in the quarter."], ["The company cut its forecast.", "Sales were flat."],
                  ["Operating loss widened to EUR 3 million."], ["The board proposes a higher dividend."] * 2,
                  ["Net sales decreased by 12 percent.", "Profit rose.", "Orders were steady."]]


def assert_as_scored_alone(loaded, texts: list[str], response: httpx.Response) -> None:
    assert response.status_code == 200, response.text
    for got, alone in zip(response.json()["data"], loaded.classify(texts), strict=True):
        assert got["label"] == alone["label"]
        assert all(abs(got["scores"][label] - alone["scores"][label]) <= 1e-4 for label in loaded.labels), (got, alone)


def classify_behind_a_held_first_request(loaded, requests: list[list[str]]) -> tuple[Gate, list]:
    """POST each request to /v1/classify while the first one holds the model, so the rest queue up behind it; then
    let the model go. Returns the gate (its calls: texts per scoring call) and the responses in request order."""
    gate = Gate(loaded)
    app = create_app(gate.run)
    with running(app) as http, ThreadPoolExecutor(len(requests)) as pool:
        first = pool.submit(http.post, "/v1/classify", json={"input": requests[0]})
        assert gate.entered.wait(30)
        rest = [pool.submit(http.post, "/v1/classify", json={"input": texts}) for texts in requests[1:]]
        wait_until(lambda: len(app.state.worker.waiting) == len(rest))
        gate.opened.set()
        return gate, [future.result(timeout=60) for future in [first, *rest]]


def test_requests_waiting_for_the_model_are_scored_in_one_call(loaded):
    gate, responses = classify_behind_a_held_first_request(loaded, BATCH_REQUESTS)
    assert gate.calls == [1, sum(len(texts) for texts in BATCH_REQUESTS[1:])]  # 5 requests, 2 scoring calls
    for texts, response in zip(BATCH_REQUESTS, responses):
        assert_as_scored_alone(loaded, texts, response)


def test_requests_within_the_batch_window_share_a_call(loaded):
    gate = Gate(loaded, opened=True)
    with running(create_app(gate.run, batch_window_ms=500)) as http, ThreadPoolExecutor(len(BATCH_REQUESTS)) as pool:
        futures = [pool.submit(http.post, "/v1/classify", json={"input": texts}) for texts in BATCH_REQUESTS]
        responses = [future.result(timeout=60) for future in futures]
    assert len(gate.calls) < len(BATCH_REQUESTS), gate.calls
    for texts, response in zip(BATCH_REQUESTS, responses):
        assert_as_scored_alone(loaded, texts, response)


@pytest.mark.parametrize("args,expected", [
    (["{run}", "port=notanumber"], "port='notanumber' is not an integer"),
    (["{run}", "port=70000"], "port=70000 must be 1 to 65535"),
    (["{run}", "colour=blue"], "unknown option 'colour=blue'"),
    (["/nonexistent"], "run directory /nonexistent does not exist"),
])
def test_cli_bad_input_is_one_line(tiny_run, cache_dir, args, expected):
    result = run_llmtune(["serve", *[arg.format(run=tiny_run) for arg in args]], cache_dir)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llmtune: error:") and expected in lines[0], result.stderr
    assert "Traceback" not in result.stderr
