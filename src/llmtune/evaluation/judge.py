"""The LLM judge of generated Q&A answers (eval.judge): a larger model behind any OpenAI-compatible endpoint grades each
test answer of the base and the tuned model, because BLEU and ROUGE miss paraphrases and reward shared filler words.

Per answer: correctness against the reference and relevance to the question, each 1-5, with a short reason, asked for
in a JSON schema (llmtune.endpoint checks every reply; an answer whose replies never match is counted invalid and
left out of the means). The prompt is a config (conf/judge_prompt/, versioned), so a run records what graded it.
Only test answers are judged: validation is scored at every validation, where a judge would multiply the cost, and
the test rows are what the run reports.

The judge never stops a run: an unreachable endpoint, a refused key, or a request failing after the client's retries
is one warning line, and the judge's metrics of that model (and of any model after it) are left out.
"""

import logging
import re
import statistics
from collections.abc import Iterator, Mapping
from contextlib import closing, contextmanager
from dataclasses import fields

from llmtune.console import progress
from llmtune.endpoint import Endpoint, EndpointSettings, Reply, one_line
from llmtune.errors import UserError
from llmtune.evaluation.intervals import bootstrap_intervals, mean_statistics

log = logging.getLogger(__name__)

SCORES = ("correctness", "relevance")
SCALE = (1, 2, 3, 4, 5)
# The judge's means as keys of results.<model> (rows of the base-vs-tuned table), and as `llmtune report` ranks by
# them (named like tracking.FINAL_METRICS).
METRICS = tuple(f"judge_{score}" for score in SCORES)
REPORT_METRICS = (*(f"test/{name}" for name in METRICS), *(f"base/test_{name}" for name in METRICS))
REASON_CHARS = 300  # a reason is kept this long in predictions.jsonl: "short", whatever the judge wrote
VERDICT_SCHEMA = {
    "type": "object",
    "properties": {**{score: {"type": "integer", "enum": list(SCALE)} for score in SCORES},
                   "reason": {"type": "string"}},
    "required": [*SCORES, "reason"],
    "additionalProperties": False,
}
PLACEHOLDER = re.compile(r"\{(question|reference|answer)\}")
# Libraries that log every HTTP exchange and retry at INFO: hundreds of lines in a run's log, none a user acts on
# (openai sends its requests with httpx, or httpx2 in its newer releases).
CHATTY_LOGGERS = ("httpx", "httpx2", "openai")


class EndpointFailed(Exception):
    """A request failed after the client's retries: the endpoint went away or keeps refusing."""


class AnswerJudge:
    """Grades lists of Q&A predictions through one endpoint, checked on first use. Once the endpoint has failed it
    grades nothing more: one warning per run, and no second wait on a server that is gone."""

    def __init__(self, settings: Mapping):
        """settings: eval.judge (see conf/eval/default.yaml), url set."""
        self.prompt = settings["prompt"]
        self.max_rows = settings["max_rows"]
        self.endpoint_settings = EndpointSettings(**{field.name: settings[field.name]
                                                     for field in fields(EndpointSettings) if field.name in settings})
        self.endpoint: Endpoint | None = None
        self.failed = False

    def grade(self, predictions: list[dict]) -> dict | None:
        """The judge's metrics of the first max_rows predictions, each of which gets its verdict under `judge` (for
        predictions.jsonl); None, after one warning, when the endpoint fails."""
        if self.failed:
            return None
        judged = predictions[:self.max_rows]
        try:
            with quieted(CHATTY_LOGGERS):
                endpoint = self._checked_endpoint()
                before = endpoint.tally.counts()  # the endpoint is shared by the models judged: count this one's
                verdicts = self._verdicts(endpoint, judged)
        except (UserError, EndpointFailed) as error:
            return self._give_up(str(error))
        except Exception as error:  # a metric, never worth the run: the trained weights are not even saved yet
            return self._give_up(f"{type(error).__name__}: {one_line(error)}")
        for prediction, verdict in zip(judged, verdicts):
            prediction["judge"] = verdict
        metrics = verdict_metrics(verdicts)
        metrics["judge"].update(model=endpoint.model, prompt_version=self.prompt["version"],
                                endpoint=endpoint.tally.summary(self.endpoint_settings, since=before))
        return metrics

    def _give_up(self, why: str) -> None:
        self.failed = True
        log.warning("eval.judge: %s; the run goes on without the judge's metrics", why)

    def messages(self, prediction: dict) -> list[dict]:
        """The chat asking for one answer's verdict: the prompt's placeholders filled in one pass (a brace in a
        question or answer is never taken for a placeholder)."""
        texts = {"question": prediction["text"], "reference": prediction["gold"], "answer": prediction["predicted"]}
        user = PLACEHOLDER.sub(lambda match: texts[match.group(1)], self.prompt["user"])
        return [{"role": "system", "content": self.prompt["system"]}, {"role": "user", "content": user}]

    def _checked_endpoint(self) -> Endpoint:
        if self.endpoint is None:
            endpoint = Endpoint(self.endpoint_settings)
            endpoint.check()  # unreachable, key refused, no model: a UserError naming it
            self.endpoint = endpoint
        return self.endpoint

    def _verdicts(self, endpoint: Endpoint, predictions: list[dict]) -> list[dict]:
        """One verdict per prediction, in order. Predictions already judged keep theirs: a prompting method's tuned
        and base answers are one list."""
        verdicts = [prediction.get("judge") for prediction in predictions]
        unjudged = [index for index, verdict in enumerate(verdicts) if verdict is None]

        def ask(index: int) -> Reply:
            return endpoint.ask_json(self.messages(predictions[index]), VERDICT_SCHEMA, "answer_verdict")

        with closing(endpoint.map(ask, unjudged)) as replies:  # closed at once on failure: nothing more is sent
            for index, reply in progress(replies, len(unjudged), "judging answers", unit="answer"):
                if reply.failed:
                    raise EndpointFailed(f"endpoint {self.endpoint_settings.url} failed: {reply.error}")
                verdicts[index] = verdict_of(reply)
        return verdicts


def verdict_of(reply: Reply) -> dict:
    """What predictions.jsonl keeps of a reply: the two scores and the reason, or why no reply matched the schema."""
    if reply.value is None:
        return {"invalid": reply.error}
    reason = " ".join(reply.value["reason"].split())[:REASON_CHARS]  # one line: report.md shows it in a list item
    return {**{score: reply.value[score] for score in SCORES}, "reason": reason}


def verdict_metrics(verdicts: list[dict]) -> dict:
    """Each score's mean over the valid verdicts (None if none is), its 95% bootstrap interval over the judged rows,
    and its distribution (how many answers got 1, 2, ... 5)."""
    per_row = {f"judge_{score}": [verdict.get(score) for verdict in verdicts] for score in SCORES}
    means = {name: statistics.fmean(valid) if (valid := [v for v in values if v is not None]) else None
             for name, values in per_row.items()}
    invalid = sum("invalid" in verdict for verdict in verdicts)
    distribution = {score: {str(grade): per_row[f"judge_{score}"].count(grade) for grade in SCALE}
                    for score in SCORES}
    return {**means, "intervals": bootstrap_intervals(mean_statistics(per_row), len(verdicts)),
            "judge": {"rows": len(verdicts), "valid": len(verdicts) - invalid, "invalid": invalid,
                      "distribution": distribution}}


def rouge_disagreement(records: list[dict]) -> dict | None:
    """On each test question whose base and tuned answers both got a valid verdict: which answer is better by the
    judge's correctness and by ROUGE-L against the reference, and how often the two disagree. A pair where either
    calls it a tie is not counted. None when no pair has two verdicts."""
    from llmtune.evaluation.metrics import rouge_per_row

    pairs = [record for record in records
             if "correctness" in record.get("judge", {}) and "correctness" in record.get("base_judge", {})]
    if not pairs:
        return None
    golds = [record["gold"] for record in pairs]
    tuned_rouge = rouge_per_row([record["predicted"] for record in pairs], golds)["rougeL"]
    base_rouge = rouge_per_row([record["base_predicted"] for record in pairs], golds)["rougeL"]
    counted = disagreements = 0
    for record, tuned, base in zip(pairs, tuned_rouge, base_rouge):
        judge_prefers = sign(record["judge"]["correctness"] - record["base_judge"]["correctness"])
        rouge_prefers = sign(tuned - base)
        if judge_prefers and rouge_prefers:
            counted += 1
            disagreements += judge_prefers != rouge_prefers
    return {"pairs": len(pairs), "counted": counted, "ties_excluded": len(pairs) - counted,
            "disagreements": disagreements, "disagreement_rate": disagreements / counted if counted else None}


def reported_metrics(results: dict) -> dict[str, float]:
    """The judge's means a run has, under their REPORT_METRICS names (test/...: the tuned model, base/test_...)."""
    sources = {"test": "tuned", "base": "base"}
    found = {}
    for name in REPORT_METRICS:
        prefix, key = name.split("/")
        value = (results.get(sources[prefix]) or {}).get(key.removeprefix("test_"))
        if value is not None:
            found[name] = value
    return found


def sign(difference: float, tolerance: float = 1e-9) -> int:
    return 0 if abs(difference) <= tolerance else 1 if difference > 0 else -1


def run_summary(results: dict, records: list[dict]) -> dict | None:
    """metrics.json's `judge`: the judge model and prompt version, the endpoint's tally over every model judged,
    and how often the judge and ROUGE-L disagree on base vs tuned; None when no model was judged."""
    judged = [results[name]["judge"] for name in ("base", "tuned") if "judge" in (results.get(name) or {})]
    if not judged:
        return None
    tally = {key: sum(part["endpoint"][key] for part in judged) for key in judged[0]["endpoint"]}
    tally["cost_usd"] = round(tally["cost_usd"], 6)
    return {"model": judged[0]["model"], "prompt_version": judged[0]["prompt_version"], "endpoint": tally,
            "agreement_with_rougeL": rouge_disagreement(records)}


def report_lines(summary: dict, tuned_name: str) -> list[str]:
    """report.md's judge section: the scores' distributions base vs tuned, the disagreement with ROUGE-L, the
    endpoint's tally; nothing when no model was judged."""
    judge = summary.get("judge")
    if not judge:
        return []
    results = summary["results"]
    models = [(name, label) for name, label in (("base", "base"), ("tuned", tuned_name))
              if "judge" in (results.get(name) or {})]
    lines = ["", "## LLM judge", "",
             f"Graded by `{judge['model']}` (prompt version {judge['prompt_version']}), 1 (worst) to 5 (best); "
             "per answer in predictions.jsonl (`judge`, `base_judge`: the scores and the judge's reason).", "",
             "| model | score | " + " | ".join(map(str, SCALE)) + " | mean | answers with a valid verdict |",
             "|---|---|" + "---|" * len(SCALE) + "---|---|"]
    for name, label in models:
        part = results[name]["judge"]
        for score in SCORES:
            mean = results[name].get(f"judge_{score}")
            counts = " | ".join(str(part["distribution"][score][str(grade)]) for grade in SCALE)
            lines.append(f"| {label} | {score} | {counts} | {'-' if mean is None else f'{mean:.2f}'} | "
                         f"{part['valid']} of {part['rows']} |")
    lines += ["", agreement_line(judge["agreement_with_rougeL"], tuned_name), "", tally_line(judge["endpoint"])]
    return lines


def agreement_line(agreement: dict | None, tuned_name: str) -> str:
    if agreement is None:
        return "Judge vs ROUGE-L: no question has a valid verdict on both answers (base and tuned)."
    if not agreement["counted"]:
        return (f"Judge vs ROUGE-L: of {agreement['pairs']} questions judged on both answers, every one is a tie for "
                "the judge or for ROUGE-L: nothing to compare.")
    return (f"Judge vs ROUGE-L on which answer is better (base or {tuned_name}, the same question): they disagree on "
            f"{agreement['disagreements']} of {agreement['counted']} pairs ({agreement['disagreement_rate']:.0%}); "
            f"{agreement['ties_excluded']} of {agreement['pairs']} pairs left out as a tie for either.")


def tally_line(tally: dict) -> str:
    cost = f", ${tally['cost_usd']:.4f}" if tally["cost_usd"] else ""
    return (f"Judge endpoint: {tally['requests']} requests ({tally['failed_requests']} failed after retries, "
            f"{tally['invalid_replies']} replies not matching the schema), {tally['prompt_tokens']} prompt + "
            f"{tally['completion_tokens']} completion tokens{cost}.")


@contextmanager
def quieted(names: tuple[str, ...]) -> Iterator[None]:
    """The named loggers at WARNING or above for the block (their levels restored after)."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(max(logger.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
