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

A classification-head run (method=classifier) classifies the raw text with its head, as its evaluation did; it
generates no text, so its chat and completion routes answer 400 (code "model_does_not_generate").

Generation: temperature defaults to 0 (greedy, reproducible, as the run's evaluation decodes; up to 2 samples),
max_tokens defaults to the server's max_new_tokens and may not exceed it, stop is a string or up to 4 strings (chat
also stops at the end of the prompt format's answer turn). Stop strings cut the text after generation, so
usage.completion_tokens counts every generated token. n must be 1; stream=true is refused (no SSE).

Structured output: response_format {"type": "json_schema", "json_schema": {"name", "schema", "strict"}} constrains
generation (lm-format-enforcer, llmtune.structured) so that the reply is JSON matching the schema, whatever the
model would write; {"type": "json_object"} to any JSON object; {"type": "text"} (or none) is free text. The reply
then runs until its JSON is complete (the answer turn's closing token is allowed only there, and does not cut a
line break inside the JSON) or max_tokens (finish_reason "length", the JSON unfinished); stop strings still cut it.
A schema with a keyword the constraint would not enforce (a number's bounds, format, oneOf, ...) gets 400, code
"unsupported_schema", naming the keyword and where it is; an integer range of at most 1000 values is enforced.

Every error is JSON in OpenAI's shape {"error": {"message", "type", "code"}}: invalid JSON or a request that does
not validate -> 400 (never FastAPI's 422), a body over max_body_bytes -> 413 (checked before parsing), a prompt over
max_prompt_tokens tokens or max_tokens over max_new_tokens -> 400, text that is not valid Unicode (a lone surrogate
such as "\\ud800") -> 400, an empty or whitespace-only /v1/classify input -> 400 naming its index (predict skips such
rows as bad).

Under load: one thread runs the model, one call at a time, in arrival order; at most max_queue requests (64: 50
concurrent classify clients fit, and are scored together) wait for it, and past that a request gets 429 at once
with a Retry-After header. A request not answered within request_timeout_s seconds (60) of arriving gets 504 (one
already running on the model finishes, unread). /v1/classify requests waiting together (arriving while the model is
busy, or within batch_window_ms (10) of the first) are scored in one call, up to 256 texts; each gets its own rows
back, as scored alone (benchmarks/README.md, "Serving under load": 50 clients, 4.7-5.1x the requests/s).
"""

import asyncio
import math
import os
import socket
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import AfterValidator, BaseModel, Field
from pydantic_core import PydanticCustomError
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmtune.cli import Quantize, option, parse, positional, quantize_choice
from llmtune.errors import UserError

if TYPE_CHECKING:
    from llmtune.inference import LoadedRun

MAX_CLASSIFY_INPUTS = 256
MAX_STOP_STRINGS = 4  # as OpenAI's API
MAX_BATCH_TEXTS = 256  # texts per micro-batched scoring call: one full request, or many small ones
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
ROUTES = ["GET  /v1/models", "POST /v1/classify"]
GENERATION_ROUTES = ["POST /v1/chat/completions", "POST /v1/completions"]  # a model that generates text only


class ApiError(Exception):
    """A request the server refuses: answered as {"error": {"message", "type", "code"}} with this status."""

    def __init__(self, status: int, message: str, code: str, type: str = "invalid_request_error",
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.type, self.headers = status, message, code, type, headers


def error_response(status: int, message: str, code: str | None, type: str = "invalid_request_error",
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type, "code": code}}, status_code=status,
                        headers=headers)


def valid_unicode(value: str | list[str]) -> str | list[str]:
    """JSON may escape a lone surrogate ("\\ud800"), which Python decodes into a str no tokenizer or UTF-8 encoder
    takes: refuse it as the client's error (400), not a crash halfway through the model (500)."""
    for i, text in enumerate([value] if isinstance(value, str) else value):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as error:
            where = "" if isinstance(value, str) else f"text {i}: "
            raise PydanticCustomError("unicode", "{where}not valid Unicode (a lone surrogate at character {at}): "
                                                 "send UTF-8 text", {"where": where, "at": error.start}) from None
    return value


# On the union as a whole, so an error names the field, not each member of the union it tried.
Text = Annotated[str, AfterValidator(valid_unicode)]
Texts = Annotated[str | list[str], AfterValidator(valid_unicode)]


class ClassifyRequest(BaseModel):
    model: Text | None = None
    input: Texts


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: Text


class JsonSchemaFormat(BaseModel):
    name: Text | None = None  # OpenAI requires a name; nothing here reads it, so a client may leave it out
    description: Text | None = None
    json_schema: dict = Field(alias="schema")  # "schema" itself would shadow a BaseModel method
    strict: bool | None = None  # the reply always matches the schema: strict or not, generation is constrained


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class GenerationRequest(BaseModel):
    """Fields both generating routes share; unknown fields (top_p, user, ...) are ignored, as clients send them."""
    model: Text | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    stop: Texts | None = None
    stream: bool = False
    n: int = 1
    response_format: ResponseFormat | None = None


class ChatRequest(GenerationRequest):
    messages: list[Message] = Field(min_length=1)


class CompletionRequest(GenerationRequest):
    prompt: Text


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


@dataclass(eq=False)  # identity, not field equality: jobs are found in and removed from the queue
class Job:
    """One request's work for the model thread: run() (generation), or texts to score (merged with other jobs')."""
    run: Callable[[], object] | None = None
    texts: list[str] | None = None
    arrived: float = field(default_factory=time.monotonic)
    future: Future = field(default_factory=Future)


class ModelWorker:
    """The one thread that runs the model: generate() and scoring are not thread-safe, and two forwards at once on
    the same cores would only slow each other down. In front of it, a queue of at most max_queue jobs."""

    def __init__(self, loaded: "LoadedRun", check_prompt: Callable[[str], int], max_queue: int,
                 batch_window_s: float):
        self.loaded, self.check_prompt = loaded, check_prompt
        self.max_queue, self.batch_window_s = max_queue, batch_window_s
        self.waiting: deque[Job] = deque()
        self.changed = threading.Condition()
        self.seconds_per_call = 1.0  # a running average, for Retry-After
        self.stopping = False
        threading.Thread(target=self._loop, name="llmtune-model", daemon=True).start()

    def submit(self, job: Job) -> Future:
        with self.changed:
            if len(self.waiting) >= self.max_queue:
                # Time for the waiting jobs to run one call each (they may batch, so at most that), at least 1 s.
                retry = max(1, math.ceil(self.seconds_per_call * len(self.waiting)))
                raise ApiError(429, f"the server is busy: {len(self.waiting)} requests are waiting for the model "
                                    f"(max_queue={self.max_queue}); retry after {retry} s", "queue_full",
                               "rate_limit_error", {"Retry-After": str(retry)})
            self.waiting.append(job)
            self.changed.notify()
        return job.future

    def withdraw(self, job: Job) -> None:
        """A job nobody waits for any more leaves the queue at once, freeing its place."""
        with self.changed:
            if job in self.waiting:
                self.waiting.remove(job)

    def stop(self) -> None:
        with self.changed:
            self.stopping = True
            self.changed.notify_all()

    def _loop(self) -> None:
        while True:
            with self.changed:
                while not self.waiting and not self.stopping:
                    self.changed.wait()
                if self.stopping:
                    return
                job = self.waiting.popleft()
            batch = [job] if job.texts is None else self._gather(job)
            live = [j for j in batch if j.future.set_running_or_notify_cancel()]  # false: timed out, nobody waits
            if not live:
                continue
            start = time.monotonic()
            if job.texts is not None:
                self._classify(live)
            else:
                self._settle(job, job.run)
            self.seconds_per_call = 0.8 * self.seconds_per_call + 0.2 * (time.monotonic() - start)

    def _gather(self, first: Job) -> list[Job]:
        """first and the classify jobs waiting now or arriving until batch_window_s after it arrived, up to
        MAX_BATCH_TEXTS texts in all; generation jobs keep their places in the queue."""
        batch, n_texts = [first], len(first.texts)
        with self.changed:
            while True:
                for job in [j for j in self.waiting if j.texts is not None]:
                    if n_texts + len(job.texts) > MAX_BATCH_TEXTS:
                        return batch  # in arrival order: a later, smaller job does not jump this one
                    self.waiting.remove(job)
                    batch.append(job)
                    n_texts += len(job.texts)
                left = first.arrived + self.batch_window_s - time.monotonic()
                if left <= 0:
                    return batch
                self.changed.wait(left)

    def _classify(self, jobs: list[Job]) -> None:
        """One scoring call over all jobs' texts, each job's rows back to it; a job with a prompt over the limit
        fails alone."""
        ready = []
        for job in jobs:
            try:
                prompts = self.loaded.prompts(job.texts)  # with rag=true, retrieval runs once per text
                for prompt in prompts:
                    self.check_prompt(prompt)
                ready.append((job, prompts))
            except Exception as error:  # the request's own error, answered by its handler
                job.future.set_exception(error)
        if not ready:
            return
        try:
            results = self.loaded.classify_prompts([prompt for _, prompts in ready for prompt in prompts])
        except Exception as error:  # every request of the batch gets it; the thread goes on
            for job, _ in ready:
                job.future.set_exception(error)
            return
        start = 0
        for job, prompts in ready:
            job.future.set_result(results[start:start + len(prompts)])
            start += len(prompts)

    @staticmethod
    def _settle(job: Job, run: Callable[[], object]) -> None:
        try:
            job.future.set_result(run())
        except Exception as error:  # answered by the request's handler; the thread goes on
            job.future.set_exception(error)


def create_app(loaded: "LoadedRun", max_body_bytes: int = 65536, max_new_tokens: int = 256,
               max_prompt_tokens: int = 2048, max_queue: int = 64, request_timeout_s: float = 60.0,
               batch_window_ms: float = 10.0) -> FastAPI:
    """The API for one loaded run (routes and limits: the module docstring)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        worker.stop()  # after the server has answered its last request

    # openapi_url too: with only the docs off, /openapi.json still describes every route.
    app = FastAPI(title=f"llmtune: {loaded.name}", openapi_url=None, docs_url=None, redoc_url=None,
                  lifespan=lifespan)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    created = int((loaded.run_dir / "config.yaml").stat().st_mtime)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError):
        return error_response(error.status, error.message, error.code, error.type, error.headers)

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
        if not loaded.generates:
            raise ApiError(400, f"'{loaded.name}' is a method={loaded.method.name} run: its model classifies and does "
                                "not generate text; use POST /v1/classify", "model_does_not_generate")
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

    def json_schema_of(request: GenerationRequest) -> dict | None:
        """The schema the reply must match (None: free text), checked before the request waits for the model."""
        from llmtune.structured import ANY_OBJECT, UnsupportedSchema, enforceable_schema

        response_format = request.response_format
        if response_format is None or response_format.type == "text":
            return None
        if response_format.type == "json_object":
            return enforceable_schema(ANY_OBJECT)
        if response_format.json_schema is None:
            raise ApiError(400, "response_format.json_schema is missing: send {\"type\": \"json_schema\", "
                                "\"json_schema\": {\"name\": ..., \"schema\": {...}}}", "invalid_request")
        try:
            return enforceable_schema(response_format.json_schema.json_schema)
        except UnsupportedSchema as error:
            raise ApiError(400, f"response_format.json_schema.schema is not supported: {error}",
                           "unsupported_schema") from None

    worker = app.state.worker = ModelWorker(loaded, check_prompt, max_queue, batch_window_ms / 1000)  # state: tests

    async def on_model(job: Job):
        """The job's result from the model thread; 504 once request_timeout_s have passed, rather than a hang."""
        try:
            return await asyncio.wait_for(asyncio.wrap_future(worker.submit(job)), request_timeout_s)
        except TimeoutError:  # wait_for has cancelled the job if it had not started
            worker.withdraw(job)
            raise ApiError(504, f"no answer within {request_timeout_s:g} s (request_timeout_s): the server is "
                                "overloaded or the request is too long; retry later, or send less",
                           "timeout", "server_error") from None

    async def generate(prompt_of: Callable[[], str], request: GenerationRequest, stop: list[str],
                       max_tokens: int, end_texts: list[str] | None = None) -> dict:
        json_schema = json_schema_of(request)

        def run() -> dict:  # on the model thread: prompt_of may retrieve (rag=true), and the tokenizer is shared
            prompt = prompt_of()
            check_prompt(prompt)
            return loaded.generate(prompt, max_tokens, request.temperature, stop, end_texts, json_schema)

        return await on_model(Job(run=run))

    def usage(result: dict) -> dict:
        return {"prompt_tokens": result["prompt_tokens"], "completion_tokens": result["completion_tokens"],
                "total_tokens": result["prompt_tokens"] + result["completion_tokens"]}

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": loaded.name, "object": "model", "created": created,
                                            "owned_by": "llmtune"}]}

    @app.post("/v1/classify")
    async def classify(request: ClassifyRequest):
        check_model(request.model)
        if loaded.labels is None:
            raise ApiError(400, f"'{loaded.name}' is a Q&A run: it has no labels to classify into; use "
                                "/v1/chat/completions, or serve a classification run", "not_a_classification_run")
        texts = [request.input] if isinstance(request.input, str) else request.input
        if not texts or len(texts) > MAX_CLASSIFY_INPUTS:
            raise ApiError(400, f"input has {len(texts)} texts; send 1 to {MAX_CLASSIFY_INPUTS} per request",
                           "too_many_inputs" if texts else "invalid_request")
        empty = [i for i, text in enumerate(texts) if not text.strip()]
        if empty:  # as predict, which skips such rows as bad: no text, nothing to classify
            more = f" (and {len(empty) - 1} more)" if len(empty) > 1 else ""
            raise ApiError(400, f"input {empty[0]} is empty or whitespace only{more}: send text to classify",
                           "empty_input")
        results = await on_model(Job(texts=texts))
        return {"object": "list", "model": loaded.name,
                "data": [{"index": i, **result} for i, result in enumerate(results)]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: ChatRequest):
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
        result = await generate(lambda: loaded.prompts([text], prompt_format)[0], request, stop, max_tokens,
                                loaded.stop_texts())
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": loaded.name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": result["text"]},
                             "finish_reason": result["finish_reason"]}],
                "usage": usage(result)}

    @app.post("/v1/completions")
    async def completions(request: CompletionRequest):
        max_tokens, stop = generation_options(request)
        if not request.prompt:
            raise ApiError(400, "prompt is empty: send the text to continue", "invalid_request")
        result = await generate(lambda: request.prompt, request, stop, max_tokens)
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": loaded.name,
                "choices": [{"index": 0, "text": result["text"], "logprobs": None,
                             "finish_reason": result["finish_reason"]}],
                "usage": usage(result)}

    return app


@dataclass(frozen=True)
class ServeArgs:
    """Serve a finished run behind an OpenAI-compatible HTTP API: GET /v1/models, POST /v1/classify,
    /v1/chat/completions and /v1/completions (`python -m pydoc llmtune.serve` describes each route)."""

    run_dir: Path = positional("a finished run's folder (its name may hold '=', e.g. ...-rag=False)",
                               metavar="RUN_DIR")
    host: str = option("127.0.0.1", "address to listen on; beyond loopback anyone who reaches it may use the model",
                       metavar="HOST")
    port: int = option(8000, "port to listen on", minimum=1, maximum=65535)
    model: str | None = option(None, "an exported folder or .gguf to serve", metavar="PATH",
                               default_text="the run's own adapter")
    max_body_bytes: int = option(65536, "a larger request body gets 413", minimum=1)
    max_new_tokens: int = option(256, "the most tokens one request may generate", minimum=1)
    max_prompt_tokens: int = option(2048, "a longer prompt gets 400", minimum=1)
    max_queue: int = option(64, "requests waiting for the model; past that a request gets 429 with Retry-After",
                            minimum=1)
    request_timeout_s: float = option(60.0, "a request not answered by then gets 504", minimum=0.001)
    batch_window_ms: float = option(10.0, "how long /v1/classify waits to gather concurrent requests into one batch",
                                    minimum=0.0)
    trust_remote_code: bool = option(False, "load a run whose config asks for remote code or names its own model.path")
    quantize: Quantize | None = option(None, "int8: the decoder's linear layers in int8 (CPU); none: the model's dtype",
                                       default_text="the run's eval.quantize")


def parse_args(argv: list[str]) -> tuple[Path, dict]:
    """RUN_DIR and the key=value options, checked before anything slow loads."""
    args = parse(ServeArgs, argv, "serve")
    return args.run_dir, asdict(args)


def listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound here so a port in use is one clear line, not uvicorn's log and exit."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        # uvicorn's own backlog (Python's default is 128): a burst of connects waits to be accepted, not reset.
        return socket.create_server((host, port), family=family, backlog=2048)
    except OSError as error:
        reason = os.strerror(error.errno) if error.errno else str(error)
        raise UserError(f"cannot listen on {host}:{port} ({reason}): pick another port= or "
                        "host=") from None


def main(argv: list[str]) -> None:
    run_dir, options = parse_args(argv)
    host, port = options["host"], options["port"]
    os.environ.setdefault("TQDM_DISABLE", "1")  # no per-request progress bars from scoring in the server's log
    # torch's OpenMP threads otherwise spin between batches and starve the server's own threads on a small machine
    # (throughput measured in benchmarks/README.md, "Serving under load"); set before torch is imported.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import uvicorn

    from llmtune.inference import load_run, run_config

    cfg = run_config(run_dir)  # a wrong folder is named before a busy port is
    sock = listen(host, port)  # before the model loads, so a busy port fails fast
    loaded = load_run(run_dir, options["model"], trust_remote_code=options["trust_remote_code"],
                      quantize=quantize_choice(options["quantize"], cfg))
    app = create_app(loaded, options["max_body_bytes"], options["max_new_tokens"], options["max_prompt_tokens"],
                     max_queue=options["max_queue"], request_timeout_s=options["request_timeout_s"],
                     batch_window_ms=options["batch_window_ms"])
    url_host = f"[{host}]" if ":" in host else host
    print(f"llmtune serve: {loaded.name} at http://{url_host}:{port}")
    for route in ROUTES + (GENERATION_ROUTES if loaded.generates else []):
        print(f"  {route}")
    if host not in LOOPBACK:
        print(f"llmtune serve: warning: listening on {host} with no authentication: anyone who can reach this port "
              "can use the model", file=sys.stderr)
    sys.stdout.flush()
    uvicorn.Server(uvicorn.Config(app, host=host, port=port)).run(sockets=[sock])


if __name__ == "__main__":
    from llmtune.errors import report_user_errors

    report_user_errors(main)(sys.argv[1:])
