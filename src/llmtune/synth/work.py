"""Asking the endpoint for a list of work items, at most `concurrency` at once, each answered item recorded in the
progress log as it arrives; items already in the log are never asked again. Two stops save minutes of useless
requests: replies that never match the schema, and an endpoint that keeps failing."""

from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

from llmtune.console import progress
from llmtune.endpoint import Endpoint
from llmtune.errors import UserError
from llmtune.synth.folder import SynthFolder

# Work items that must end without one valid reply, before any has had one, to conclude that the endpoint's replies
# never match the schema (each already asked `attempts` times).
SCHEMA_PROBE_ITEMS = 3
# Failed requests in a row (after the client's own retries) that stop the run: the server is down or refuses them.
MIN_FAILURES_IN_A_ROW = 3


@dataclass(frozen=True)
class WorkItem:
    key: str  # its name in the progress log, e.g. "qa/chunk-3" or "judge/qa/chunk-3/0"
    messages: list[dict]
    schema: dict
    schema_name: str
    stored: Callable[[dict], dict]  # the valid reply -> what the progress log keeps of it


@dataclass
class PhaseCounts:
    items: int = 0  # work items in the phase
    done_before: int = 0  # answered in an earlier run (read from the progress log)
    asked: int = 0  # asked in this run
    valid: int = 0  # answered with a reply matching the schema, in this run
    invalid: int = 0  # every attempt's reply failed to parse or match the schema
    failed: int = 0  # the request failed after the client's retries (connection, timeout, HTTP error)
    errors: list[str] = field(default_factory=list)  # a few of the reasons, for the summary

    def public(self) -> dict:
        return {name: getattr(self, name) for name in ("items", "done_before", "asked", "valid", "invalid", "failed")}


def run_phase(endpoint: Endpoint, items: list[WorkItem], folder: SynthFolder, desc: str, counts: PhaseCounts) -> None:
    """Ask every item not yet in the progress log; record each valid reply at once, and count what happened in
    `counts` (kept by the caller, so a stop still reports them). Raises UserError when replies never match the
    schema, or when requests keep failing; what was recorded stays for a rerun."""
    todo = [item for item in items if item.key not in folder.done]
    counts.items, counts.done_before = len(items), len(items) - len(todo)
    failures_in_a_row, stop_after_failures = 0, max(MIN_FAILURES_IN_A_ROW, endpoint.settings.concurrency)

    def ask(item: WorkItem):
        return endpoint.ask_json(item.messages, item.schema, item.schema_name)

    with closing(endpoint.map(ask, todo)) as replies:
        for item, reply in progress(replies, total=len(todo), desc=desc, unit="item"):
            counts.asked += 1
            if reply.value is not None:
                folder.append(item.key, item.stored(reply.value))
                counts.valid += 1
                failures_in_a_row = 0
                continue
            if len(counts.errors) < 3:
                counts.errors.append(f"{item.key}: {reply.error}")
            if reply.failed:
                counts.failed += 1
                failures_in_a_row += 1
                if failures_in_a_row >= stop_after_failures:
                    raise keeps_failing(endpoint, failures_in_a_row, reply.error, len(folder.done))
            else:
                counts.invalid += 1
                failures_in_a_row = 0
            # Before any valid reply (in this run or an earlier one), the first few items all invalid: the endpoint
            # ignores the schema, and the rest would be asked `attempts` times each for nothing.
            if counts.valid == counts.done_before == 0 and counts.invalid >= min(SCHEMA_PROBE_ITEMS, len(todo)):
                raise never_matched(endpoint, counts, reply.error)


def keeps_failing(endpoint: Endpoint, failures: int, error: str, answered: int) -> UserError:
    return UserError(f"endpoint {public_url(endpoint.settings.url)} failed {failures} requests in a row (last: "
                     f"{error}); check that its server is up and accepts these requests, then rerun the same "
                     f"command: the {answered} items answered so far are kept and not asked again")


def never_matched(endpoint: Endpoint, counts: PhaseCounts, error: str) -> UserError:
    return UserError(f"endpoint {public_url(endpoint.settings.url)}'s replies never matched the JSON schema "
                     f"({counts.invalid} of the first {counts.asked} items, {endpoint.settings.attempts} attempts "
                     f"each; last: {error}); use a model and server that support response_format json_schema "
                     "(vLLM, llama.cpp server, Ollama, OpenAI), or a larger model; a reply cut short at "
                     f"max_tokens={endpoint.settings.max_tokens} is invalid too")


def public_url(url: str) -> str:
    """The URL without a password (http://user:secret@host -> http://user:***@host): provenance and messages only
    ever show this."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))
