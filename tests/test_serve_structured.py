"""`llmtune serve` with response_format: replies constrained to JSON (a schema, or any object), over real HTTP on the
tiny run, whose model writes near-random text: whatever it picks, the reply must parse and match the schema."""

import copy
import json
from dataclasses import replace

import jsonschema
import pytest
import torch
from lmformatenforcer import JsonSchemaParser
from openai import BadRequestError, OpenAI
from pydantic import BaseModel, Field
from test_serve import assert_error, running

from llmtune.inference import load_run
from llmtune.serve import create_app
from llmtune.structured import StrictJson, UnsupportedSchema, enforceable_schema

MAX_NEW_TOKENS = 400  # room for the whole reply: the tiny model pads JSON with whitespace
MESSAGES = [{"role": "system", "content": "Grade the answer."}, {"role": "user", "content": "Profit rose sharply."}]
# A string, an integer in a range and an array of objects; bounded lengths so that any reply ends within
# MAX_NEW_TOKENS, whatever the untrained model writes.
GRADE = {"type": "object", "additionalProperties": False, "required": ["reason", "score", "claims"],
         "properties": {"reason": {"type": "string", "maxLength": 24},
                        "score": {"type": "integer", "minimum": 1, "maximum": 5},
                        "claims": {"type": "array", "minItems": 1, "maxItems": 2,
                                   "items": {"type": "object", "required": ["text", "supported"],
                                             "properties": {"text": {"type": "string", "maxLength": 12},
                                                            "supported": {"type": "boolean"}}}}}}


def json_schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "grade", "schema": schema, "strict": True}}


@pytest.fixture(scope="module")
def loaded(tiny_run):
    return load_run(tiny_run)


@pytest.fixture(scope="module")
def client(loaded):
    with running(create_app(loaded, max_new_tokens=MAX_NEW_TOKENS, max_prompt_tokens=100)) as http:
        yield http


def chat(client, response_format: dict, **fields) -> dict:
    response = client.post("/v1/chat/completions", json={"messages": MESSAGES, "response_format": response_format,
                                                         **fields})
    assert response.status_code == 200, response.text
    return response.json()


@pytest.mark.parametrize("temperature", [0.0, 1.0, 1.0, 1.0])
def test_json_schema_reply_matches_the_schema(client, temperature):
    body = chat(client, json_schema_format(GRADE), temperature=temperature)
    choice, usage = body["choices"][0], body["usage"]
    assert choice["finish_reason"] == "stop", choice
    jsonschema.validate(json.loads(choice["message"]["content"]), GRADE)
    assert usage["prompt_tokens"] > 0 and 0 < usage["completion_tokens"] < MAX_NEW_TOKENS
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


@pytest.fixture(scope="module")
def closing_run(loaded):
    """The run with a model that, like a trained one, closes what it opens: the tiny model never picks a closing
    quote (greedy, it loops in a string forever), so an object of free keys and values would never end. Here the
    quote's score is raised most and the closing brace's next, after the model's own computation."""
    model = copy.deepcopy(loaded.model)
    bias = torch.zeros(model.config.vocab_size)
    for text, raise_by in (('"', 20.0), ("}", 10.0)):
        (token,) = loaded.tokenizer(text, add_special_tokens=False).input_ids
        bias[token] = raise_by
    model.lm_head.register_forward_hook(lambda module, inputs, logits: logits + bias)
    return replace(loaded, model=model)


def test_json_object_reply_is_an_object(closing_run):
    with running(create_app(closing_run, max_new_tokens=MAX_NEW_TOKENS)) as http:
        unconstrained = http.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 4}).json()
        body = chat(http, {"type": "json_object"})
    assert unconstrained["choices"][0]["message"]["content"].startswith('"')  # left alone, no JSON object
    assert body["choices"][0]["finish_reason"] == "stop"
    assert isinstance(json.loads(body["choices"][0]["message"]["content"]), dict)


def test_text_format_is_free_text(client):
    free = client.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 8}).json()["choices"][0]
    assert chat(client, {"type": "text"}, max_tokens=8)["choices"][0] == free


def test_completions_route_honours_the_schema(client):
    schema = {"type": "array", "maxItems": 3, "items": {"enum": ["positive", "negative", "neutral"]}}
    response = client.post("/v1/completions", json={"prompt": "Labels:", "response_format": json_schema_format(schema)})
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    assert choice["finish_reason"] == "stop"
    jsonschema.validate(json.loads(choice["text"]), schema)


def test_a_reply_cut_by_max_tokens_is_length(client):
    body = chat(client, json_schema_format(GRADE), max_tokens=5)
    assert body["choices"][0]["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 5


@pytest.mark.parametrize("schema,message_part", [
    ({"type": "number", "minimum": 0}, "minimum at the top level cannot be enforced"),
    ({"type": "object", "properties": {"n": {"type": "integer", "minimum": 0}}}, "closed range"),
    ({"type": "string", "format": "email"}, "format at the top level cannot be enforced"),
    ({"oneOf": [{"type": "string"}, {"type": "integer"}]}, "oneOf"),
    ({"type": "object", "properties": {"a": {"$ref": "#/$defs/Missing"}}}, "names no schema"),
    ({"type": "object", "required": ["b"], "properties": {"a": {"type": "string"}}}, "not in properties"),
    ({"type": "date"}, "not a JSON type"),
])
def test_a_schema_it_cannot_enforce_is_400(client, schema, message_part):
    response = client.post("/v1/chat/completions", json={"messages": MESSAGES,
                                                         "response_format": json_schema_format(schema)})
    assert_error(response, 400, message_part)
    assert response.json()["error"]["code"] == "unsupported_schema"


def test_an_unknown_or_incomplete_response_format_is_400(client):
    assert_error(client.post("/v1/chat/completions", json={"messages": MESSAGES, "response_format": {"type": "xml"}}),
                 400, "response_format.type")
    assert_error(client.post("/v1/chat/completions", json={"messages": MESSAGES,
                                                           "response_format": {"type": "json_schema"}}),
                 400, "response_format.json_schema is missing")
    assert_error(client.post("/v1/completions", json={"prompt": "x", "response_format": {
        "type": "json_schema", "json_schema": {"name": "n", "schema": "not an object"}}}), 400, "schema")


def test_schemas_are_rewritten_into_what_the_enforcer_enforces():
    assert enforceable_schema({"type": "integer", "minimum": 1, "exclusiveMaximum": 4}) == {"enum": [1, 2, 3]}
    assert enforceable_schema({"type": ["string", "null"], "maxLength": 3}) == {
        "anyOf": [{"type": "string", "maxLength": 3}, {"type": "null"}]}
    assert enforceable_schema({"enum": ["a", 2, None]}) == {
        "anyOf": [{"type": "string", "enum": ["a"]}, {"enum": [2]}, {"type": "null"}]}
    with pytest.raises(UnsupportedSchema, match="nests deeper"):
        nested = {"type": "array"}
        for _ in range(40):
            nested = {"type": "array", "items": nested}
        enforceable_schema(nested)


def allowed_after(schema: dict, text: str) -> str:
    parser = StrictJson(JsonSchemaParser(enforceable_schema(schema)))
    for character in text:
        parser = parser.add_character(character)
    return parser.get_allowed_characters()


def test_the_json_grammar_holes_of_the_parser_are_closed():
    """lm-format-enforcer alone allows the refused continuations, which make invalid JSON or a fraction where the
    schema wants an integer (seen in the tiny model's replies before StrictJson); what is valid stays allowed."""
    numbers = {"type": "object", "properties": {"n": {"type": "integer"}, "x": {"type": "number"}}}
    assert not set("eE.+") & set(allowed_after(numbers, '{"n": 12'))  # 12e-3, 12.5
    assert "." not in allowed_after(numbers, '{"n": -0')
    assert set(allowed_after(numbers, '{"x": 1.')) == set("0123456789")  # not 1.e5
    assert "e" in allowed_after(numbers, '{"x": 1.5')  # a number may still take its exponent
    assert "}" not in allowed_after(numbers, '{"n": 1,')  # {"n": 1,}
    assert "}" in allowed_after({"type": "object", "properties": {"n": {"type": "string"}}}, '{"n": "a,')


class Claim(BaseModel):
    text: str = Field(max_length=12)
    supported: bool


class Verdict(BaseModel):
    """As a judge client declares its reply: pydantic's schema ($defs, titles), through the openai client."""
    reason: str = Field(max_length=24)
    score: int = Field(ge=1, le=5)
    claims: list[Claim] = Field(min_length=1, max_length=2)


def test_the_openai_client_gets_replies_in_its_schema(client, loaded):
    openai = OpenAI(base_url=f"{str(client.base_url).rstrip('/')}/v1", api_key="x", max_retries=0)
    schema = Verdict.model_json_schema()
    reply = openai.chat.completions.create(model=loaded.name, messages=MESSAGES, max_tokens=MAX_NEW_TOKENS,
                                           response_format=json_schema_format(schema))
    assert reply.choices[0].finish_reason == "stop" and reply.usage.completion_tokens > 0
    jsonschema.validate(json.loads(reply.choices[0].message.content), schema)
    parsed = openai.chat.completions.parse(model=loaded.name, messages=MESSAGES, response_format=Verdict)
    assert isinstance(parsed.choices[0].message.parsed, Verdict)
    with pytest.raises(BadRequestError, match="maximum at the top level cannot be enforced") as refused:
        openai.chat.completions.create(model=loaded.name, messages=MESSAGES,
                                       response_format=json_schema_format({"type": "number", "maximum": 1}))
    assert refused.value.status_code == 400 and refused.value.code == "unsupported_schema"
