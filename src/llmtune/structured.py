"""Generation constrained to JSON that matches a schema (`llmtune serve`'s response_format), with lm-format-enforcer.

lm-format-enforcer walks the tokenizer's vocabulary along a character-level JSON parser and says which tokens may come
next; JsonLogits masks every other token out of each generation step, so the reply is JSON matching the schema, and
an end token is allowed only once that JSON is complete. Its own transformers integration does not import with
transformers 5 (it imports `transformers.tokenization_utils`, gone in 5.0), so the vocabulary walk is built here from
its TokenEnforcer API, as its vLLM integration does.

The parser enforces only part of JSON Schema and silently skips the rest (a number's bounds, a string's format, oneOf
...), so enforceable_schema() first rewrites a schema into what it enforces (an integer range becomes an enum, a list
of types an anyOf) and refuses, naming the keyword, anything it would not enforce: a reply that ignored part of the
schema would otherwise pass for one that matches it.
"""

import copy
import json
import math
from dataclasses import dataclass

import numpy as np
import torch
from lmformatenforcer import (CharacterLevelParser, CharacterLevelParserConfig, JsonSchemaParser, RegexParser,
                              TokenEnforcer, TokenEnforcerTokenizerData, UnionParser)
from lmformatenforcer.jsonschemaparser import NumberParsingState, StringParsingState
from transformers import LogitsProcessor

# Keywords that describe a schema without constraining the value: nothing to enforce.
ANNOTATIONS = {"title", "description", "$schema", "$id", "$comment", "default", "examples", "deprecated", "readOnly",
               "writeOnly"}
# Per type, the keywords the parser enforces (integer bounds through an enum, see _integer).
ENFORCED = {"object": {"properties", "required", "additionalProperties"},
            "array": {"items", "minItems", "maxItems"},
            "string": {"minLength", "maxLength", "pattern"},
            "integer": {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"},
            "number": set(), "boolean": set(), "null": set()}
# Any JSON value: the parser has no schema for "anything" ({} or true), so spell it out as it does for an untyped array.
ANY_VALUE = {"anyOf": [{"type": kind} for kind in ("string", "number", "boolean", "null", "object", "array")]}
ANY_OBJECT = {"type": "object"}  # response_format json_object: an object, keys and values free
MAX_INTEGER_RANGE = 1000  # an integer range is enforced as an enum of its values: the parser tries each per step
MAX_DEPTH = 32  # nested schemas; deeper is refused rather than recursed into


class UnsupportedSchema(ValueError):
    """A schema the constraint cannot enforce in full; the message names the keyword and where it is."""


def enforceable_schema(schema: object) -> dict:
    """schema rewritten into what lm-format-enforcer enforces, meaning the same; UnsupportedSchema if it cannot be."""
    if not isinstance(schema, dict):
        raise UnsupportedSchema("the schema must be a JSON object")
    definitions = {}
    for key in ("$defs", "definitions"):  # the parser looks $ref names up in the root's $defs or definitions only
        if key in schema:
            if not isinstance(schema[key], dict):
                raise UnsupportedSchema(f"{key} must be an object of named schemas")
            definitions[key] = {name: _lower(sub, f"{key}.{name}", schema, 1) for name, sub in schema[key].items()}
    lowered = {**_lower({k: v for k, v in schema.items() if k not in definitions}, "", schema, 0), **definitions}
    try:
        JsonSchemaParser(lowered)  # the parser's own checks of the root (its pydantic model of the schema)
    except Exception as error:
        raise UnsupportedSchema(f"lm-format-enforcer refuses it: {error}") from None
    return lowered


def _lower(schema: object, path: str, root: dict, depth: int) -> dict:
    where = f" at {path}" if path else " at the top level"
    if depth > MAX_DEPTH:
        raise UnsupportedSchema(f"the schema nests deeper than {MAX_DEPTH} levels{where}")
    if schema is True:
        return ANY_VALUE
    if not isinstance(schema, dict):
        raise UnsupportedSchema(f"expected a schema (a JSON object){where}, got {json.dumps(schema)[:40]}")
    keys = set(schema) - ANNOTATIONS
    if "$ref" in keys:
        return _reference(schema, keys, where, root)
    if "anyOf" in keys:
        _only(keys, {"anyOf"}, where, "beside anyOf")
        options = schema["anyOf"]
        if not isinstance(options, list) or not options:
            raise UnsupportedSchema(f"anyOf{where} must be a non-empty list of schemas")
        return {"anyOf": [_lower(option, f"{path}.anyOf[{i}]", root, depth + 1) for i, option in enumerate(options)]}
    if "allOf" in keys:
        _only(keys, {"allOf"}, where, "beside allOf")
        if not isinstance(schema["allOf"], list) or len(schema["allOf"]) != 1:
            raise UnsupportedSchema(f"allOf{where} is enforced only with one schema in it (pydantic's wrapper of a "
                                    "$ref); merge the schemas into one")
        return _lower(schema["allOf"][0], f"{path}.allOf[0]", root, depth + 1)
    if "enum" in keys or "const" in keys:
        return _enum(schema, keys, where)
    kind = schema.get("type")
    if kind is None:  # untyped: the type its keywords imply, as a validator would read them
        implied = [t for t in ("object", "array", "string", "integer") if keys & ENFORCED[t]]
        if not keys:
            return ANY_VALUE
        if len(implied) != 1:
            raise UnsupportedSchema(f"no type{where}: give \"type\" (keywords {sorted(keys)})")
        kind = implied[0]
    if isinstance(kind, list):  # ["string", "null"]: each type with the keywords that apply to it
        if not kind or any(t not in ENFORCED for t in kind):
            raise UnsupportedSchema(f"type{where} must list JSON types, not {kind}")
        _only(keys - {"type"}, set().union(*(ENFORCED[t] for t in kind)), where, f"for types {kind}")
        return {"anyOf": [_typed(schema, keys, t, path, where, root, depth) for t in dict.fromkeys(kind)]}
    if kind not in ENFORCED:
        raise UnsupportedSchema(f"type {json.dumps(kind)}{where} is not a JSON type ({', '.join(ENFORCED)})")
    _only(keys - {"type"}, ENFORCED[kind], where, f"for type {kind}")
    return _typed(schema, keys, kind, path, where, root, depth)


def _only(keys: set, allowed: set, where: str, context: str) -> None:
    extra = sorted(keys - allowed)
    if extra:
        enforced = ", ".join(sorted(allowed)) or "none beyond the type"
        raise UnsupportedSchema(f"{', '.join(extra)}{where} cannot be enforced {context} (keywords enforced there: "
                                f"{enforced}): drop it, and check it on receipt if it matters")


def _reference(schema: dict, keys: set, where: str, root: dict) -> dict:
    _only(keys, {"$ref"}, where, "beside $ref")
    ref = schema["$ref"]
    parts = ref.split("/") if isinstance(ref, str) else []
    if len(parts) != 3 or parts[0] != "#" or parts[1] not in ("$defs", "definitions"):
        raise UnsupportedSchema(f"$ref {json.dumps(ref)}{where}: only \"#/$defs/NAME\" or \"#/definitions/NAME\" "
                                "references are followed")
    if not isinstance(root.get(parts[1]), dict) or parts[2] not in root[parts[1]]:
        raise UnsupportedSchema(f"$ref {ref}{where} names no schema in the top level's {parts[1]}")
    return {"$ref": ref}


def _enum(schema: dict, keys: set, where: str) -> dict:
    """enum or const as the parser's enums: strings (quoted) and numbers (bare); null and booleans as their types."""
    _only(keys, {"enum", "const", "type"}, where, "beside enum or const")
    values = [schema["const"]] if "const" in schema else schema["enum"]
    if not isinstance(values, list) or not values:
        raise UnsupportedSchema(f"enum{where} must be a non-empty list")
    strings = [v for v in values if isinstance(v, str)]
    numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    booleans = {v for v in values if isinstance(v, bool)}
    if len(strings) + len(numbers) + len(booleans) + values.count(None) != len(values):
        raise UnsupportedSchema(f"enum{where} holds an object or array: only strings, numbers, booleans and null")
    kind = schema.get("type")
    fits = {"string": strings, "number": numbers, "integer": [v for v in numbers if float(v).is_integer()],
            "boolean": booleans, "null": [None] * values.count(None)}
    if isinstance(kind, str) and len(fits.get(kind, [])) != len(values):
        raise UnsupportedSchema(f"enum or const{where} holds values that are not of its type {kind}")
    if len(booleans) == 1:  # the parser's enums are strings and numbers; a boolean is enforced only as either
        raise UnsupportedSchema(f"enum or const{where} allows one boolean: the constraint can only enforce both "
                                "(type boolean)")
    options = ([{"type": "string", "enum": strings}] if strings else []) + ([{"enum": numbers}] if numbers else []) \
        + ([{"type": "boolean"}] if booleans else []) + ([{"type": "null"}] if None in values else [])
    return options[0] if len(options) == 1 else {"anyOf": options}


def _typed(schema: dict, keys: set, kind: str, path: str, where: str, root: dict, depth: int) -> dict:
    if kind == "object":
        return _object(schema, path, where, root, depth)
    if kind == "array":
        return _array(schema, path, where, root, depth)
    if kind == "string":
        return _string(schema, where)
    if kind == "integer" and keys & ENFORCED["integer"]:
        return _integer(schema, where)
    return {"type": kind}


def _object(schema: dict, path: str, where: str, root: dict, depth: int) -> dict:
    properties, required = schema.get("properties"), schema.get("required", [])
    additional = schema.get("additionalProperties", True)
    if not isinstance(required, list) or not all(isinstance(name, str) for name in required):
        raise UnsupportedSchema(f"required{where} must be a list of property names")
    if properties is None and additional is False:
        properties = {}  # no property at all: {}
    if properties is None:
        if required:  # keys are free text then: nothing steers the model to the required names
            raise UnsupportedSchema(f"required{where} without properties: list the required keys in properties")
        if additional is True:
            return {"type": "object"}
        return {"type": "object", "additionalProperties": _lower(additional, f"{path}.additionalProperties",
                                                                 root, depth + 1)}
    if not isinstance(properties, dict):
        raise UnsupportedSchema(f"properties{where} must be an object of named schemas")
    missing = [name for name in required if name not in properties]
    if missing:
        raise UnsupportedSchema(f"required{where} names {missing}, not in properties: the object could never end")
    awkward = [name for name in properties if '"' in name or "\\" in name]
    if awkward:  # the parser matches key names character by character, without JSON escapes
        raise UnsupportedSchema(f"property names{where} with a quote or backslash cannot be enforced: {awkward}")
    # With properties the parser writes only those keys, so additionalProperties (whatever it allows) always holds.
    return {"type": "object", "required": required,
            "properties": {name: _lower(sub, f"{path}.{name}" if path else name, root, depth + 1)
                           for name, sub in properties.items()}}


def _array(schema: dict, path: str, where: str, root: dict, depth: int) -> dict:
    lowered = {"type": "array", "items": _lower(schema.get("items", True), f"{path}[]", root, depth + 1)}
    bounds = {key: schema[key] for key in ("minItems", "maxItems") if key in schema}
    _check_counts(bounds, "minItems", "maxItems", where)
    return {**lowered, **bounds}


def _string(schema: dict, where: str) -> dict:
    lengths = {key: schema[key] for key in ("minLength", "maxLength") if key in schema}
    _check_counts(lengths, "minLength", "maxLength", where)
    if "pattern" not in schema:
        return {"type": "string", **lengths}
    if lengths:
        raise UnsupportedSchema(f"pattern{where} with minLength or maxLength cannot be enforced together: put the "
                                "length in the pattern")
    pattern = schema["pattern"]
    try:
        RegexParser(str(pattern).removeprefix("^").removesuffix("$"))  # as the parser reads it: anchored anyway
    except Exception as error:
        raise UnsupportedSchema(f"pattern {json.dumps(pattern)}{where} cannot be enforced: {error}") from None
    return {"type": "string", "pattern": pattern}


def _check_counts(bounds: dict, low: str, high: str, where: str) -> None:
    for key, value in bounds.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise UnsupportedSchema(f"{key}{where} must be a non-negative integer")
    if bounds.get(low, 0) > bounds.get(high, math.inf):
        raise UnsupportedSchema(f"{low} is over {high}{where}: nothing can match")


def _integer(schema: dict, where: str) -> dict:
    """An integer range as an enum of its values: the parser's numbers have no bounds (and allow exponents)."""
    low, high = -math.inf, math.inf
    for key, value in schema.items():
        if key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum") and (
                isinstance(value, bool) or not isinstance(value, (int, float))):
            raise UnsupportedSchema(f"{key}{where} must be a number (draft 4's boolean exclusiveMinimum and "
                                    "exclusiveMaximum are not read)")
    if "minimum" in schema:
        low = math.ceil(schema["minimum"])
    if "exclusiveMinimum" in schema:
        low = max(low, math.floor(schema["exclusiveMinimum"]) + 1)
    if "maximum" in schema:
        high = math.floor(schema["maximum"])
    if "exclusiveMaximum" in schema:
        high = min(high, math.ceil(schema["exclusiveMaximum"]) - 1)
    if math.isinf(low) or math.isinf(high) or high - low + 1 > MAX_INTEGER_RANGE:
        raise UnsupportedSchema(f"integer bounds{where} are enforced only as a closed range of at most "
                                f"{MAX_INTEGER_RANGE} values (both a minimum and a maximum): give both, or drop them "
                                "and check on receipt")
    if low > high:
        raise UnsupportedSchema(f"integer bounds{where} leave no value")
    return {"enum": list(range(low, high + 1))}


def writable(token_text: str) -> bool:
    """Whether the constraint may write this token. Not one that decodes to U+FFFD, part of a character (a byte of
    its UTF-8): the parser reads characters, takes such a byte into a string as the character U+FFFD, and then
    miscounts whatever completes it. Nor one with a control character other than a line break: JSON has them nowhere
    outside strings and only escaped in them, and the parser's shortcut for free text in strings lets them in raw
    (a tab too; line breaks it keeps out; indentation is left with spaces)."""
    return "\ufffd" not in token_text and not any(ord(c) < 0x20 and c not in "\n\r" for c in token_text)


@dataclass
class JsonVocabulary:
    """What the constraint knows of a tokenizer, built once per served model (a pass over the whole vocabulary)."""
    tokenizer_data: TokenEnforcerTokenizerData
    blank: frozenset[int]  # the tokens that decode to whitespace only
    blank_start: torch.Tensor  # the ids of the tokens whose text starts with whitespace

    @classmethod
    def of(cls, tokenizer, vocab_size: int) -> "JsonVocabulary":
        """vocab_size: the model's (its logits' width), which may differ from the tokenizer's by unused ids."""
        vocab_size = min(vocab_size, len(tokenizer))
        special = set(tokenizer.all_special_ids)
        ids = [i for i in range(vocab_size) if i not in special]
        # Decoded after "0" a token keeps its leading space (a tokenizer drops it at the start of a text); that it
        # gains one there marks a word start (as lm-format-enforcer's own integrations build this list).
        zero = tokenizer("0", add_special_tokens=False).input_ids[-1]
        after_zero = tokenizer.batch_decode([[zero, i] for i in ids])
        alone = tokenizer.batch_decode([[i] for i in ids])
        regular = [(i, text[1:], len(text) - 1 > len(bare)) for i, text, bare in zip(ids, after_zero, alone)
                   if writable(text[1:])]
        blank = frozenset(i for i, text, _ in regular if text and not text.strip())
        blank_start = torch.tensor([i for i, text, _ in regular if text[:1].isspace()], dtype=torch.long)

        def decode(token_ids: list[int]) -> str:  # a character cut between tokens shows as U+FFFD: not yet there
            return tokenizer.decode(token_ids).rstrip("\ufffd")

        # The end ids are set per request (JsonLogits): they depend on the prompt format's closing token.
        return cls(TokenEnforcerTokenizerData(regular, decode, [], False, vocab_size), blank, blank_start)


class JsonLogits(LogitsProcessor):
    """Masks each step's scores to the tokens that keep the generated text (after prompt_length) a prefix of JSON
    matching the schema; end_ids only once the JSON is complete, and then only they (not more whitespace)."""

    def __init__(self, vocabulary: JsonVocabulary, schema: dict, prompt_length: int, end_ids: list[int]):
        data = copy.copy(vocabulary.tokenizer_data)  # the shared token tree, with this request's end tokens
        data.eos_token_id = list(end_ids)
        self.enforcer = TokenEnforcer(data, StrictJson(JsonSchemaParser(schema)))
        self.prompt_length, self.end_ids, self.vocabulary = prompt_length, list(end_ids), vocabulary

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        allowed = torch.zeros_like(scores, dtype=torch.bool)
        for row in range(input_ids.shape[0]):
            generated = input_ids[row, self.prompt_length:].tolist()
            tokens = self.enforcer.get_allowed_tokens(generated).allowed_tokens
            tokens = self.end_ids if self.complete(tokens) else tokens
            # Through numpy: in a free-text string nearly the whole vocabulary is allowed, and torch indexing with
            # a list of 250,000 ints (Gemma's vocabulary) takes ~80 ms a step, numpy's conversion ~5 ms.
            allowed[row, torch.from_numpy(np.fromiter(tokens, dtype=np.int64, count=len(tokens)))] = True
            if starts_bounded_string(self.enforcer.prefix_states[tuple(generated)].parser.inner):
                allowed[row, self.vocabulary.blank_start] = False
        return scores.masked_fill(~allowed, -math.inf)

    def complete(self, allowed: list[int]) -> bool:
        """Whether the JSON is complete: an end is allowed, and otherwise only whitespace, which the parser lets
        follow a complete value (up to 12 characters). The end is then the only choice, so the reply ends where its
        JSON does instead of padding it."""
        blank = self.vocabulary.blank
        if len(allowed) > len(blank) + len(self.end_ids):  # most steps: free text or structure to write
            return False
        return any(token in self.end_ids for token in allowed) and \
            all(token in blank or token in self.end_ids for token in allowed)


class StrictJson(CharacterLevelParser):
    """lm-format-enforcer's JSON parser (inner) with three holes in its JSON grammar closed: it allows an object or
    array to close right after a comma ({"a": 1,}), an exponent right after a decimal point (1.e5), and an integer
    to take a fraction or an exponent (-0.5, 1e-3). Outside strings, none of them may follow here. The rest is the
    inner parser's."""

    def __init__(self, inner: CharacterLevelParser, in_string: bool = False, escaped: bool = False,
                 previous: str = "", last_solid: str = ""):
        # No CharacterLevelParser.__init__: the configuration is the inner parser's (a UnionParser has none).
        self.inner, self.in_string, self.escaped = inner, in_string, escaped
        self.previous, self.last_solid = previous, last_solid  # the last character, the last outside whitespace

    @property
    def config(self) -> CharacterLevelParserConfig:
        return self.inner.config

    @config.setter
    def config(self, config: CharacterLevelParserConfig) -> None:  # TokenEnforcer sets the tokenizer's alphabet
        self.inner.config = config

    def add_character(self, character: str) -> "StrictJson":
        in_string, escaped, last_solid = self.in_string, False, self.last_solid
        if in_string:
            escaped = character == "\\" and not self.escaped
            in_string = self.escaped or character != '"'
        elif character == '"':
            in_string = True
        if not character.isspace() and not self.in_string:
            last_solid = character
        return StrictJson(self.inner.add_character(character), in_string, escaped, character, last_solid)

    def get_allowed_characters(self) -> str:
        allowed = self.inner.get_allowed_characters()
        if self.in_string:
            return allowed
        if self.previous == ".":
            return "".join(c for c in allowed if c.isdigit())
        if self.last_solid == ",":
            return allowed.replace("}", "").replace("]", "")
        if writing_integer(self.inner):
            return "".join(c for c in allowed if c not in ".eE+")
        return allowed

    def can_end(self) -> bool:
        return self.inner.can_end()

    def shortcut_key(self):
        return self.inner.shortcut_key()

    def cache_key(self):
        return self.inner.cache_key()


def writing_integer(parser) -> bool:
    """Whether the value being written is a number the schema wants whole (type integer), not any number."""
    stack = getattr(parser, "object_stack", None)
    top = stack[-1] if stack else None
    numbers = [p for p in (top.parsers if isinstance(top, UnionParser) else [top]) if isinstance(p, NumberParsingState)]
    return bool(numbers) and not any(number.allow_floating_point for number in numbers)


def starts_bounded_string(parser) -> bool:
    """Whether the parser (any option of a union) is at the start of a string value with a maxLength or a pattern.
    lm-format-enforcer 0.11 drops whitespace there without counting it (StringParsingState.add_character), so a
    string starting with spaces could run past its maxLength, or past its pattern; there it may not start so."""
    for option in parser.parsers if isinstance(parser, UnionParser) else [parser]:
        stack = getattr(option, "object_stack", None)
        top = stack[-1] if stack else None
        if isinstance(top, StringParsingState) and top.seen_opening_quote and not top.seen_closing_quote \
                and not top.parsed_string and (top.max_length is not None or top.regex_parser is not None):
            return True
    return False
