"""A client for any OpenAI-compatible chat endpoint (`/v1/chat/completions`: vLLM, a llama.cpp server, Ollama, a hosted
API, or `llmtune serve`), for the commands that ask a larger model to write or to grade: `llmtune synth` and the
Q&A judge metric (eval.judge).

Built on the `openai` package, which retries connection errors, timeouts, 408, 409, 429 and 5xx replies with
exponential backoff and honours Retry-After. Replies are asked for in a JSON schema (`response_format`) and checked on
receipt; one that does not parse or match is asked again (sampled at `retry_temperature` or hotter) up to `attempts`
times, then counted as invalid. At most `concurrency` requests are in flight. The API key is read from the environment
only (the variable `api_key_env` names) and never written anywhere: provenance files record the variable's name.
"""

import json
import os
import re
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

import jsonschema

from llmtune.errors import UserError

# Local servers (llama.cpp, vLLM, Ollama, llmtune serve) take any key; the openai client refuses to start without one.
NO_KEY = "not-needed"
CODE_FENCE = re.compile(r"^\s*```(?:json)?\s*(.*?)\s*```\s*$", re.DOTALL)


@dataclass(frozen=True)
class EndpointSettings:
    url: str  # the API's base URL, e.g. http://127.0.0.1:8000/v1
    model: str | None = None  # None: the first model the endpoint lists at /v1/models
    api_key_env: str = "OPENAI_API_KEY"  # the environment variable holding the key; unset: no key (local servers)
    concurrency: int = 4  # requests in flight at once
    timeout_s: float = 120.0  # per request, before the client retries it
    max_retries: int = 4  # retries of a failed request (connection, timeout, 429, 5xx), with exponential backoff
    attempts: int = 3  # requests per item until a reply matches the schema
    temperature: float = 0.7
    # Attempts after an invalid reply sample at least this hot: at temperature 0 a greedy server (llama.cpp, vLLM,
    # llmtune serve) repeats the same invalid reply, so asking again the same way is a wasted request.
    retry_temperature: float = 0.7
    max_tokens: int = 512
    usd_per_million_input_tokens: float = 0.0  # for the cost tally; 0: not priced (a local server)
    usd_per_million_output_tokens: float = 0.0

    def public(self) -> dict:
        """The settings as written to provenance files and metrics (the key's variable name, never its value)."""
        return asdict(self)


@dataclass
class Tally:
    """What the endpoint was asked and answered, across threads."""
    requests: int = 0  # completed HTTP exchanges (the client's own retries not counted)
    failed_requests: int = 0  # requests that failed after the client's retries
    invalid_replies: int = 0  # replies that did not parse as JSON or match the schema
    prompt_tokens: int = 0
    completion_tokens: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **counts: int) -> None:
        with self.lock:
            for name, count in counts.items():
                setattr(self, name, getattr(self, name) + count)

    def counts(self) -> dict[str, int]:
        with self.lock:
            return {name: getattr(self, name) for name in COUNTED}

    def summary(self, settings: EndpointSettings, since: dict[str, int] | None = None) -> dict:
        """The counts and their cost; since: counts() taken earlier, to tally only what was asked after it."""
        counts = self.counts()
        if since is not None:
            counts = {name: count - since[name] for name, count in counts.items()}
        cost = (counts["prompt_tokens"] * settings.usd_per_million_input_tokens
                + counts["completion_tokens"] * settings.usd_per_million_output_tokens) / 1e6
        return {**counts, "cost_usd": round(cost, 6)}


COUNTED = ("requests", "failed_requests", "invalid_replies", "prompt_tokens", "completion_tokens")


class Reply(NamedTuple):
    value: dict | None  # the reply as JSON matching the schema; None if none did
    error: str | None  # why not
    failed: bool = False  # the request itself failed (after the client's retries), rather than the reply being invalid


class Endpoint:
    def __init__(self, settings: EndpointSettings):
        from openai import OpenAI

        self.settings = settings
        self.tally = Tally()
        self.model = settings.model
        key = os.environ.get(settings.api_key_env) or NO_KEY
        self.client = OpenAI(base_url=settings.url, api_key=key, max_retries=settings.max_retries,
                             timeout=settings.timeout_s)

    def check(self) -> str:
        """The model to ask, after one request to /models: an unreachable endpoint or a refused key is a UserError
        here, before any work. A server without /models is fine when the model is named."""
        import openai

        url = without_credentials(self.settings.url)
        try:
            listed = [model.id for model in self.client.with_options(max_retries=1).models.list()]
        except (openai.APIConnectionError, openai.APITimeoutError) as error:
            raise UserError(f"endpoint {url} is unreachable ({error}); start its server, or give the API's base URL "
                            "(e.g. http://127.0.0.1:8000/v1)") from None
        except openai.AuthenticationError:
            raise UserError(f"endpoint {url} refused the API key; put a valid key in the environment variable "
                            f"{self.settings.api_key_env}") from None
        except openai.NotFoundError:
            listed = []
        except openai.APIStatusError as error:
            raise UserError(f"endpoint {url} answered /models with HTTP {error.status_code}; check the URL "
                            "(the API's base, ending in /v1)") from None
        if self.model is None:
            if not listed:
                raise UserError(f"endpoint {url} lists no model; name one with model=")
            self.model = listed[0]
        return self.model

    def ask_json(self, messages: list[dict], schema: dict, schema_name: str) -> Reply:
        """A reply matching schema, asking up to settings.attempts times; a request that fails after the client's
        retries ends the item (Reply(None, reason))."""
        import openai

        error = None
        for attempt in range(self.settings.attempts):
            temperature = self.settings.temperature if attempt == 0 else max(self.settings.temperature,
                                                                             self.settings.retry_temperature)
            try:
                response = self.client.chat.completions.create(
                    model=self.model, messages=messages, temperature=temperature,
                    max_tokens=self.settings.max_tokens,
                    response_format={"type": "json_schema",
                                     "json_schema": {"name": schema_name, "schema": schema, "strict": True}})
            except openai.APIError as failure:
                self.tally.add(failed_requests=1)
                return Reply(None, f"request failed: {one_line(failure)}", failed=True)
            usage = response.usage
            self.tally.add(requests=1, prompt_tokens=getattr(usage, "prompt_tokens", 0) or 0,
                           completion_tokens=getattr(usage, "completion_tokens", 0) or 0)
            text = response.choices[0].message.content if response.choices else None
            value, error = parse_reply(text, schema)
            if value is not None:
                return Reply(value, None)
            self.tally.add(invalid_replies=1)
        return Reply(None, error)

    def map(self, ask: Callable[[Any], Any], items: Iterable) -> Iterator[tuple[Any, Any]]:
        """(item, ask(item)) for every item, as each finishes, with at most settings.concurrency asked at once."""
        items = list(items)
        with ThreadPoolExecutor(max_workers=self.settings.concurrency) as pool:
            futures = {pool.submit(ask, item): item for item in items}
            try:
                for future in as_completed(futures):
                    yield futures[future], future.result()
            finally:  # a consumer that stops early (Ctrl-C, an error) leaves no queued request to run
                for future in futures:
                    future.cancel()


def parse_reply(text: str | None, schema: dict) -> tuple[dict | None, str | None]:
    """(the reply as JSON, None) if it parses (a ```json fence allowed) and matches schema, else (None, why not)."""
    if not text or not text.strip():
        return None, "empty reply"
    fenced = CODE_FENCE.match(text)
    try:
        value = json.loads(fenced.group(1) if fenced else text)
    except json.JSONDecodeError as error:
        return None, f"reply is not JSON ({error.msg}: character {error.pos})"
    try:
        jsonschema.validate(value, schema)
    except jsonschema.ValidationError as error:
        return None, f"reply does not match the schema ({error.message})"
    return value, None


def without_credentials(url: str) -> str:
    """url as it may be printed or written: a user:password@ part replaced by ***@."""
    return re.sub(r"//[^/@]*@", "//***@", url)


def one_line(error: Exception) -> str:
    return " ".join(str(error).split())[:300]
