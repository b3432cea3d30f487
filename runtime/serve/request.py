"""The body of `POST /generate`, checked with `fastardiff run`'s own option types and messages.

A field is converted by the click type of the `run` option of the same meaning (`seed` by `--seed`, `cfg_scale`
by `--cfg`, ...), so a bad value gets the line the CLI prints for it, e.g. "Invalid value for '--temperature':
0 is out of range: must be a finite number in (0, 10]". The prompt goes through the CLI's `request_classes`
(unknown class, empty prompt, too many images); settings the API does not expose (draft, early stop, eta,
coupling) keep the CLI's defaults. What only JSON can get wrong (malformed JSON, not an object, unknown fields,
NaN) has its own one-line message. Every error is a RequestError with its HTTP status and {"error": message}:
  413  a body over MAX_BODY_BYTES (checked on Content-Length before reading, and while reading)
  415  a Content-Type other than JSON (none at all is taken as JSON)
  400  not a usable JSON object: malformed, not UTF-8, nested deeper than MAX_DEPTH (checked before parsing, so a
       hostile body cannot exhaust the parser's recursion), a repeated field, a lone UTF-16 surrogate, NaN
  422  a JSON object whose fields are wrong: unknown or missing field, a value of the wrong type or out of range
       (an integer of more than MAX_DIGITS digits is named as such, never converted), an unknown class
Messages never echo more than a short excerpt of the request.
"""
from __future__ import annotations

import json

import click

from fastardiff.errors import FastardiffError
from fastardiff.params import Number

MAX_REQUEST_IMAGES = 64
MAX_BODY_BYTES = 64 * 1024      # a full request (64 class names, every setting) is well under 4 KiB
MAX_DEPTH = 8                   # the API's deepest value is a list in the object (depth 2)
MAX_DIGITS = 30                 # no field takes an integer of more digits (seeds are below 2**32)
JSON_TYPES = ("application/json", "text/json")
# JSON field -> the `fastardiff run` parameter that validates it
FIELDS = {"prompt": "prompt", "num_images": "num_images", "seed": "seed", "mode": "mode", "gamma": "gamma",
          "cfg_scale": "cfg_scale", "temperature": "temperature"}
EXAMPLE = '{"prompt": "7", "num_images": 2, "seed": 1}'
_KINDS = {"num_images": Number(int, 1, MAX_REQUEST_IMAGES)}     # where a request's range is not the CLI's


class RequestError(FastardiffError):
    """A request the server refuses, with its HTTP status (module docstring)."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


class HugeInteger(str):
    """A JSON integer of more than MAX_DIGITS digits, kept as its text (never converted: no CPU spent on it)."""


def check_content_type(content_type: str | None) -> None:
    """415 unless the body is declared JSON (or not declared), in UTF-8."""
    if not content_type:
        return
    kind, _, rest = content_type.partition(";")
    kind = kind.strip().lower()
    if kind not in JSON_TYPES and not kind.endswith("+json"):
        raise RequestError(f"Content-Type {_excerpt(kind)!s} is not JSON; send the body as application/json, e.g. "
                           f"{EXAMPLE}", 415)
    charset = next((p.split("=", 1)[1].strip().strip('"').lower() for p in rest.split(";")
                    if p.strip().lower().startswith("charset=")), "utf-8")
    if charset not in ("utf-8", "utf8"):
        raise RequestError(f"charset {_excerpt(charset)} is not supported; send the JSON body in UTF-8", 415)


def check_size(length) -> None:
    """413 for a body (or a declared Content-Length) over MAX_BODY_BYTES."""
    if length is not None and int(length) > MAX_BODY_BYTES:
        raise RequestError(f"request body of {int(length)} bytes is over the limit of {MAX_BODY_BYTES}; a request "
                           f"is one small JSON object such as {EXAMPLE}", 413)


def run_params() -> dict:
    """The parameters of `fastardiff run` by name (their types, defaults and error messages are reused)."""
    from fastardiff.runtime.cli import run_command

    return {p.name: p for p in run_command.params}


def parse_body(body: bytes, class_names, params: dict | None = None) -> dict:
    """The job of a request body: class ids, seed and the `run` settings (gamma may still be 'auto')."""
    params = params or run_params()
    check_size(len(body))
    data = _json(body)
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise RequestError(f"unknown field {_excerpt(unknown[0])} in the request; the fields are {', '.join(FIELDS)} "
                           f"(only prompt is required), e.g. {EXAMPLE}")
    for field, value in data.items():
        if isinstance(value, HugeInteger):
            raise RequestError(_huge_message(params[FIELDS[field]], value, _KINDS.get(field)))
    if "prompt" not in data:
        missing = click.MissingParameter(param=params["prompt"], param_type="option").format_message()
        raise RequestError(f"{missing} The JSON field 'prompt' names the classes, e.g. {EXAMPLE}")
    job = {name: params[name].default for name in ("seed", "mode", "gamma", "cfg_scale", "temperature", "draft",
                                                     "coupling", "early_stop", "eta")}
    for field in ("seed", "mode", "cfg_scale", "temperature"):
        if field in data:
            job[field] = _convert(params[FIELDS[field]], data[field])
    if "gamma" in data:
        from fastardiff.runtime.cli import parse_gamma

        job["gamma"] = parse_gamma(data["gamma"])
    num_images = None
    if "num_images" in data:
        num_images = _convert(params["num_images"], data["num_images"], _KINDS["num_images"])
    job["classes"] = _classes(data["prompt"], class_names, num_images)
    return job


def _json(body: bytes) -> dict:
    def no_constant(name):
        raise RequestError(f"malformed JSON body: {name} is not a JSON number; send finite numbers, e.g. {EXAMPLE}",
                           400)

    def one_of_each(pairs):
        keys = [k for k, _ in pairs]
        repeated = next((k for i, k in enumerate(keys) if k in keys[:i]), None)
        if repeated is not None:
            raise RequestError(f"malformed JSON body: field {_excerpt(repeated)} is given twice; give each field once",
                               400)
        return dict(pairs)

    def integer(text):
        return HugeInteger(text) if len(text.lstrip("-")) > MAX_DIGITS else int(text)

    depth = nesting_depth(body)
    if depth > MAX_DEPTH:
        raise RequestError(f"malformed JSON body: nested {depth} levels deep (at "
                           f"most {MAX_DEPTH}); send one JSON object of plain fields such as {EXAMPLE}", 400)
    try:
        data = json.loads(body, parse_constant=no_constant, parse_int=integer, object_pairs_hook=one_of_each)
    except (ValueError, UnicodeDecodeError, RecursionError) as err:
        if isinstance(err, RequestError):
            raise
        where = f" (line {err.lineno} column {err.colno})" if isinstance(err, json.JSONDecodeError) else ""
        what = "not UTF-8 text" if isinstance(err, UnicodeDecodeError) else str(err).split(":")[0]
        raise RequestError(f"malformed JSON body{where}: {what}; send a JSON object such as {EXAMPLE}", 400) from None
    if not isinstance(data, dict):
        raise RequestError(f"the JSON body must be an object such as {EXAMPLE} (got {type(data).__name__})", 400)
    bad = next(_lone_surrogates(data), None)
    if bad is not None:
        raise RequestError(f"malformed JSON body: {bad} holds a lone UTF-16 surrogate (a \\ud800-\\udfff escape "
                           "without its pair); send valid Unicode text", 400)
    return data


def nesting_depth(body: bytes) -> int:
    """The deepest [ / { nesting of a JSON text (strings skipped), without parsing it: bounded work per byte."""
    depth = most = 0
    in_string = escaped = False
    for byte in body:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:          # backslash
                escaped = True
            elif byte == 0x22:          # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):      # [ {
            depth += 1
            most = max(most, depth)
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return most


def _lone_surrogates(value, where: str = "a value"):
    """Where a str (key or value) of the parsed body holds a surrogate code point (not encodable as UTF-8)."""
    if isinstance(value, str):
        if any("\ud800" <= ch <= "\udfff" for ch in value):
            yield where
    elif isinstance(value, list):
        for item in value:
            yield from _lone_surrogates(item, where)
    elif isinstance(value, dict):
        for key, item in value.items():
            if any("\ud800" <= ch <= "\udfff" for ch in key):
                yield "a field name"
            else:
                yield from _lone_surrogates(item, f"field {_excerpt(key)}")


def _excerpt(value, most: int = 40) -> str:
    """repr of a (possibly hostile) value, cut to `most` characters."""
    text = repr(value)
    return text if len(text) <= most else text[: most - 4] + "...'"


def _huge_message(param: click.Parameter, text: str, kind: click.ParamType | None = None) -> str:
    name = param.opts[0] if getattr(param, "opts", None) else param.name
    kind = kind or param.type
    digits = len(text.lstrip("-"))
    must = f": must be {kind.describe()}" if isinstance(kind, Number) else ""
    return f"Invalid value for '{name}': an integer of {digits} digits is out of range{must}"


def _convert(param: click.Parameter, value, kind: click.ParamType | None = None):
    """`value` through the click type of `param` (or `kind` under its name): the CLI's message on failure."""
    try:
        return (kind or param.type).convert(value, param, None)
    except click.BadParameter as err:
        message = err.format_message()
        raise RequestError(message if len(message) <= 300 else message[:297] + "...") from None
    except (OverflowError, ValueError, TypeError):
        raise RequestError(f"Invalid value for '{param.opts[0]}': {_excerpt(value)} is not a usable value") from None


def _classes(prompt, class_names, num_images) -> list[int]:
    from fastardiff.runtime.cli import request_classes

    if isinstance(prompt, list):
        bad = [p for p in prompt if not isinstance(p, str)]      # (a None in the list is bad too)
        if bad:
            raise RequestError(f"--prompt must be text or a list of texts (got {type(bad[0]).__name__} in the list)")
        if len(prompt) > MAX_REQUEST_IMAGES:
            raise RequestError(f"--prompt asks for {len(prompt)} images; a request makes 1..{MAX_REQUEST_IMAGES}, "
                               "split it into several requests")
        prompt = ",".join(prompt)
    return request_classes(prompt, class_names, num_images, max_images=MAX_REQUEST_IMAGES, what="a request",
                           fix="split it into several requests")
