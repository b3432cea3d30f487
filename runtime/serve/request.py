"""The body of `POST /generate`, checked with `fastardiff run`'s own option types and messages.

A field is converted by the click type of the `run` option of the same meaning (`seed` by `--seed`, `cfg_scale`
by `--cfg`, ...), so a bad value gets the line the CLI prints for it, e.g. "Invalid value for '--temperature':
0 is out of range: must be a finite number in (0, 10]". The prompt goes through the CLI's `request_classes`
(unknown class, empty prompt, too many images); settings the API does not expose (draft, early stop, eta,
coupling) keep the CLI's defaults. What only JSON can get wrong (malformed JSON, not an object, unknown fields,
NaN) has its own one-line message. Every error is a RequestError: HTTP 400 with {"error": message}.
"""
from __future__ import annotations

import json

import click

from fastardiff.errors import FastardiffError
from fastardiff.params import Number

MAX_REQUEST_IMAGES = 64
# JSON field -> the `fastardiff run` parameter that validates it
FIELDS = {"prompt": "prompt", "num_images": "num_images", "seed": "seed", "mode": "mode", "gamma": "gamma",
          "cfg_scale": "cfg_scale", "temperature": "temperature"}
EXAMPLE = '{"prompt": "7", "num_images": 2, "seed": 1}'


class RequestError(FastardiffError):
    """A request the server refuses (HTTP 400)."""


def run_params() -> dict:
    """The parameters of `fastardiff run` by name (their types, defaults and error messages are reused)."""
    from fastardiff.runtime.cli import run_command

    return {p.name: p for p in run_command.params}


def parse_body(body: bytes, class_names, params: dict | None = None) -> dict:
    """The job of a request body: class ids, seed and the `run` settings (gamma may still be 'auto')."""
    params = params or run_params()
    data = _json(body)
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise RequestError(f"unknown field {unknown[0]!r} in the request; the fields are {', '.join(FIELDS)} "
                           f"(only prompt is required), e.g. {EXAMPLE}")
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
        num_images = _convert(params["num_images"], data["num_images"], Number(int, 1, MAX_REQUEST_IMAGES))
    job["classes"] = _classes(data["prompt"], class_names, num_images)
    return job


def _json(body: bytes) -> dict:
    def no_constant(name):
        raise RequestError(f"malformed JSON body: {name} is not a JSON number; send finite numbers, e.g. {EXAMPLE}")

    try:
        data = json.loads(body, parse_constant=no_constant)
    except (ValueError, UnicodeDecodeError) as err:
        where = f" (line {err.lineno} column {err.colno})" if isinstance(err, json.JSONDecodeError) else ""
        raise RequestError(f"malformed JSON body{where}: {str(err).split(':')[0]}; send a JSON object such as "
                           f"{EXAMPLE}") from None
    if not isinstance(data, dict):
        raise RequestError(f"the JSON body must be an object such as {EXAMPLE} (got {type(data).__name__})")
    return data


def _convert(param: click.Parameter, value, kind: click.ParamType | None = None):
    """`value` through the click type of `param` (or `kind` under its name): the CLI's message on failure."""
    try:
        return (kind or param.type).convert(value, param, None)
    except click.BadParameter as err:
        raise RequestError(err.format_message()) from None


def _classes(prompt, class_names, num_images) -> list[int]:
    from fastardiff.runtime.cli import request_classes

    if isinstance(prompt, list):
        bad = next((p for p in prompt if not isinstance(p, str)), None)
        if bad is not None:
            raise RequestError(f"--prompt must be text or a list of texts (got {type(bad).__name__} in the list)")
        prompt = ",".join(prompt)
    return request_classes(prompt, class_names, num_images, max_images=MAX_REQUEST_IMAGES, what="a request",
                           fix="split it into several requests")
