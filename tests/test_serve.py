"""`llmtune serve`: the real server (uvicorn on a loopback port) answering a real HTTP client, on the tiny run."""

import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn
from conftest import run_llmtune

from llmtune.inference import load_run
from llmtune.serve import create_app

REPO = Path(__file__).resolve().parents[1]
MAX_NEW_TOKENS = 16
MAX_BODY_BYTES = 8192
MAX_PROMPT_TOKENS = 256  # the tiny model has 512 positions


@pytest.fixture(scope="module")
def loaded(tiny_run):
    return load_run(tiny_run)


@pytest.fixture(scope="module")
def client(loaded):
    """An httpx client on a uvicorn server in a background thread, stopped when the module's tests are done."""
    app = create_app(loaded, max_body_bytes=MAX_BODY_BYTES, max_new_tokens=MAX_NEW_TOKENS,
                     max_prompt_tokens=MAX_PROMPT_TOKENS)
    sock = socket.create_server(("127.0.0.1", 0))  # a free port, held from the start: no race for it
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    with httpx.Client(base_url=f"http://127.0.0.1:{sock.getsockname()[1]}", timeout=60) as http:
        yield http
    server.should_exit = True
    thread.join(timeout=10)
    sock.close()


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
