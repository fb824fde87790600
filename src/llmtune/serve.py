"""`llmtune serve RUN_DIR [key=value ...]`: a finished run behind an OpenAI-compatible HTTP API.

    llmtune serve outputs/2025-01-01/12-00-00_gemma3_270m-instruct-rag=False port=8000

Options: host (default 127.0.0.1), port (8000), model (an exported folder or .gguf, default the run's own weights),
max_body_bytes (65536), max_new_tokens (256), max_prompt_tokens (2048).

Routes (the model id is the run's folder name; a request naming another model gets 404):
    GET  /v1/models             the one model
    POST /v1/classify           {"input": str | [str, ...]} -> label, confidence and scores per input, as the run's
                                evaluation scores them (classification runs only; at most 256 inputs)
    POST /v1/chat/completions   {"messages": [...], "max_tokens"?, "temperature"?, "stop"?}: the prompt is the run's
                                prompt format; a system message replaces the run's instruction (few-shot
                                demonstrations included), the last message must be the user's and is the input, and
                                earlier turns go before it as "role: content" lines, a blank line apart;
                                a rag=true run retrieves context for that text as the run did
    POST /v1/completions        {"prompt": str, ...}: the raw continuation of the prompt as given

Generation: temperature defaults to 0 (greedy, reproducible, as the run's evaluation decodes; up to 2 samples),
max_tokens defaults to the server's max_new_tokens and may not exceed it, stop is a string or up to 4 strings (chat
also stops at the end of the prompt format's answer turn). Stop strings cut the text after generation, so
usage.completion_tokens counts every generated token. n must be 1; stream=true is refused (no SSE).

Every error is JSON in OpenAI's shape {"error": {"message", "type", "code"}}: invalid JSON or a request that does
not validate -> 400 (never FastAPI's 422), a body over max_body_bytes -> 413 (checked before parsing), a prompt over
max_prompt_tokens tokens or max_tokens over max_new_tokens -> 400. One request at a time runs on the model (a lock);
the endpoints are plain functions, so FastAPI runs them in its threadpool and the event loop stays free.
"""

import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmtune.errors import UserError
from llmtune.options import parse_options

if TYPE_CHECKING:
    from llmtune.inference import LoadedRun

MAX_CLASSIFY_INPUTS = 256
MAX_STOP_STRINGS = 4  # as OpenAI's API
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
DEFAULTS = {"host": "127.0.0.1", "port": 8000, "model": None, "max_body_bytes": 65536, "max_new_tokens": 256,
            "max_prompt_tokens": 2048}
USAGE = "llmtune serve RUN_DIR " + " ".join(f"[{k}={'PATH' if v is None else v}]" for k, v in DEFAULTS.items())
ROUTES = ["GET  /v1/models", "POST /v1/classify", "POST /v1/chat/completions", "POST /v1/completions"]


class ApiError(Exception):
    """A request the server refuses: answered as {"error": {"message", "type", "code"}} with this status."""

    def __init__(self, status: int, message: str, code: str, type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.code, self.type = status, message, code, type


def error_response(status: int, message: str, code: str | None, type: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type, "code": code}}, status_code=status)


class ClassifyRequest(BaseModel):
    model: str | None = None
    input: str | list[str]


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class GenerationRequest(BaseModel):
    """Fields both generating routes share; unknown fields (top_p, user, ...) are ignored, as clients send them."""
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    stop: str | list[str] | None = None
    stream: bool = False
    n: int = 1


class ChatRequest(GenerationRequest):
    messages: list[Message] = Field(min_length=1)


class CompletionRequest(GenerationRequest):
    prompt: str


class BodyLimit:
    """413 for a body over max_bytes, before the app parses it: the Content-Length header first, then the bytes
    actually received (a chunked request has no header), so an oversized body is never buffered whole."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and int(length) > self.max_bytes:  # the HTTP server already rejected a non-number
            return await self._too_large(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left: nobody to answer
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self._too_large(scope, receive, send)
            more = message.get("more_body", False)
        replayed = False

        async def replay():  # the body once, as read; afterwards the real channel (which reports a disconnect)
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)

    async def _too_large(self, scope, receive, send):
        response = error_response(413, f"request body is over this server's limit of {self.max_bytes} bytes "
                                       "(max_body_bytes): send less text per request", "request_too_large")
        await response(scope, receive, send)


def create_app(loaded: "LoadedRun", max_body_bytes: int = 65536, max_new_tokens: int = 256,
               max_prompt_tokens: int = 2048) -> FastAPI:
    """The API for one loaded run (routes and limits: the module docstring)."""
    app = FastAPI(title=f"llmtune: {loaded.name}", docs_url=None, redoc_url=None)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    lock = threading.Lock()  # one request at a time on the model: generate() and scoring are not thread-safe
    created = int((loaded.run_dir / "config.yaml").stat().st_mtime)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError):
        return error_response(error.status, error.message, error.code, error.type)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError):
        # 400 as OpenAI answers, not FastAPI's 422; the first problem names the field.
        first = error.errors()[0]
        if first["type"] == "json_invalid":
            reason = first.get("ctx", {}).get("error", "")
            return error_response(400, f"request body is not valid JSON: {reason}".rstrip(": "), "invalid_json")
        field = ".".join(str(part) for part in first["loc"] if part != "body")
        if not field:  # curl -d sends a form unless told otherwise, and FastAPI parses only a JSON body
            return error_response(400, "request body must be a JSON object, sent with Content-Type: "
                                       f"application/json ({first['msg']})", "invalid_request")
        more = f" (and {len(error.errors()) - 1} more problem(s))" if len(error.errors()) > 1 else ""
        return error_response(400, f"{field}: {first['msg']}{more}", "invalid_request")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):  # 404, 405 in the same shape
        return error_response(error.status_code, str(error.detail), None)

    @app.exception_handler(Exception)
    async def server_error(request: Request, error: Exception):  # Starlette still logs the traceback
        return error_response(500, f"internal error: {type(error).__name__}: {error}", None, "server_error")

    def check_model(model: str | None) -> None:
        if model is not None and model != loaded.name:
            raise ApiError(404, f"model '{model}' is not served here: this server serves '{loaded.name}' "
                                "(GET /v1/models)", "model_not_found")

    def check_prompt(prompt: str) -> int:
        n_tokens = len(loaded.tokenizer(prompt).input_ids)
        if n_tokens > max_prompt_tokens:
            raise ApiError(400, f"prompt is {n_tokens} tokens, over this server's max_prompt_tokens="
                                f"{max_prompt_tokens}: shorten the input", "context_length_exceeded")
        return n_tokens

    def generation_options(request: GenerationRequest) -> tuple[int, list[str]]:
        check_model(request.model)
        if request.stream:
            raise ApiError(400, "streaming is not supported: send stream=false (or leave it out)", "unsupported")
        if request.n != 1:
            raise ApiError(400, f"n={request.n}: this server returns one choice; send n=1", "unsupported")
        max_tokens = request.max_tokens or max_new_tokens
        if max_tokens > max_new_tokens:
            raise ApiError(400, f"max_tokens={max_tokens} is over this server's limit of {max_new_tokens} "
                                "(max_new_tokens)", "max_tokens_too_large")
        stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
        if len(stop) > MAX_STOP_STRINGS:
            raise ApiError(400, f"stop has {len(stop)} strings; at most {MAX_STOP_STRINGS}", "invalid_request")
        return max_tokens, stop

    def generate(prompt: str, request: GenerationRequest, stop: list[str], max_tokens: int) -> dict:
        with lock:
            check_prompt(prompt)
            return loaded.generate(prompt, max_tokens, request.temperature, stop)

    def usage(result: dict) -> dict:
        return {"prompt_tokens": result["prompt_tokens"], "completion_tokens": result["completion_tokens"],
                "total_tokens": result["prompt_tokens"] + result["completion_tokens"]}

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": loaded.name, "object": "model", "created": created,
                                            "owned_by": "llmtune"}]}

    @app.post("/v1/classify")
    def classify(request: ClassifyRequest):
        check_model(request.model)
        if loaded.labels is None:
            raise ApiError(400, f"'{loaded.name}' is a Q&A run: it has no labels to classify into; use "
                                "/v1/chat/completions, or serve a classification run", "not_a_classification_run")
        texts = [request.input] if isinstance(request.input, str) else request.input
        if not texts or len(texts) > MAX_CLASSIFY_INPUTS:
            raise ApiError(400, f"input has {len(texts)} texts; send 1 to {MAX_CLASSIFY_INPUTS} per request",
                           "too_many_inputs" if texts else "invalid_request")
        with lock:
            prompts = loaded.prompts(texts)  # with rag=true, retrieval runs once per text
            for prompt in prompts:
                check_prompt(prompt)
            results = loaded.classify_prompts(prompts)
        return {"object": "list", "model": loaded.name,
                "data": [{"index": i, **result} for i, result in enumerate(results)]}

    @app.post("/v1/chat/completions")
    def chat_completions(request: ChatRequest):
        max_tokens, stop = generation_options(request)
        *history, last = request.messages
        if last.role != "user":
            raise ApiError(400, f"the last message is from the {last.role}; it must be the user's (the input to "
                                "answer)", "invalid_request")
        system = [m.content for m in history if m.role == "system"]
        prompt_format = replace(loaded.prompt_format, instruction="\n".join(system)) if system \
            else loaded.prompt_format
        turns = [f"{m.role}: {m.content}" for m in history if m.role != "system"]
        text = "\n".join(turns) + "\n\n" + last.content if turns else last.content
        # rag=true runs: the run's retriever adds what it finds for this text, as in the run's own prompts.
        result = generate(loaded.prompts([text], prompt_format)[0], request, stop + loaded.stop_texts(), max_tokens)
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": loaded.name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": result["text"]},
                             "finish_reason": result["finish_reason"]}],
                "usage": usage(result)}

    @app.post("/v1/completions")
    def completions(request: CompletionRequest):
        max_tokens, stop = generation_options(request)
        if not request.prompt:
            raise ApiError(400, "prompt is empty: send the text to continue", "invalid_request")
        result = generate(request.prompt, request, stop, max_tokens)
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": loaded.name,
                "choices": [{"index": 0, "text": result["text"], "logprobs": None,
                             "finish_reason": result["finish_reason"]}],
                "usage": usage(result)}

    return app


def parse_args(argv: list[str]) -> tuple[Path, dict]:
    """RUN_DIR (always the first argument: run folder names hold '=') and the key=value options, checked before
    anything slow loads."""
    if not argv:
        raise UserError(f"serve needs a run directory: usage: {USAGE}")
    options = parse_options(argv[1:], DEFAULTS, "serve")
    for key in ("port", "max_body_bytes", "max_new_tokens", "max_prompt_tokens"):
        if options[key] < 1 or (key == "port" and options[key] > 65535):
            raise UserError(f"{key}={options[key]} must be {'1 to 65535' if key == 'port' else 'at least 1'}")
    return Path(argv[0]), options


def listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound here so a port in use is one clear line, not uvicorn's log and exit."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family)
    except OSError as error:
        reason = os.strerror(error.errno) if error.errno else str(error)
        raise UserError(f"cannot listen on {host}:{port} ({reason}): pick another port= or "
                        "host=") from None


def main(argv: list[str]) -> None:
    if argv and argv[0] in ("-h", "--help"):
        print(f"usage: {USAGE}\n\n{__doc__}")
        return
    run_dir, options = parse_args(argv)
    host, port = options["host"], options["port"]
    os.environ.setdefault("TQDM_DISABLE", "1")  # no per-request progress bars from scoring in the server's log
    import uvicorn

    from llmtune.inference import load_run, run_config

    run_config(run_dir)  # a wrong folder is named before a busy port is
    sock = listen(host, port)  # before the model loads, so a busy port fails fast
    loaded = load_run(run_dir, options["model"])
    app = create_app(loaded, options["max_body_bytes"], options["max_new_tokens"], options["max_prompt_tokens"])
    url_host = f"[{host}]" if ":" in host else host
    print(f"llmtune serve: {loaded.name} at http://{url_host}:{port}")
    for route in ROUTES:
        print(f"  {route}")
    if host not in LOOPBACK:
        print(f"llmtune serve: warning: listening on {host} with no authentication: anyone who can reach this port "
              "can use the model", file=sys.stderr)
    sys.stdout.flush()
    uvicorn.Server(uvicorn.Config(app, host=host, port=port)).run(sockets=[sock])


if __name__ == "__main__":
    from llmtune.errors import report_user_errors

    report_user_errors(main)(sys.argv[1:])
