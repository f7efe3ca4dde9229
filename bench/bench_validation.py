#!/usr/bin/env python3
"""Validation cost per request: parse + protocol checks + JSON Schema, validators side by side.

For a typical v2 body (64 floats: the bundled digits model), a larger one (784
floats: a 28x28 image) and an OpenAI chat body, prints the time per request of

- parsing: ``orjson.loads`` alone, ``gateway.jsonsafe.parse`` (orjson + the
  structural pre-scan + the duplicate-key count), and the alternative it
  replaced, the standard library with an ``object_pairs_hook`` that refuses
  duplicates (what you would write without the colon-count trick);
- the protocol checks (``gateway.v2`` / ``gateway.openai_checks``);
- the model's JSON Schema with fastjsonschema, python-jsonschema and
  jsonschema_rs (each compiled once, as the stage does at start-up);
- parse + protocol + schema, per validator: the stage's whole cost;

and how fast hostile bodies are refused (10,000-level nesting, a million-element
array, a duplicate key hidden deep). Best of ``--repeat`` runs; CPU time on this
machine, so compare rows with each other, not with another machine.

    python bench/bench_validation.py [--repeat 5]

End-to-end throughput with validation on vs off: ``python bench/overhead.py
--variants full,full-novalidate``.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
import timeit
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fastjsonschema  # noqa: E402
import jsonschema  # noqa: E402
import jsonschema_rs  # noqa: E402
import orjson  # noqa: E402

from gateway import jsonsafe  # noqa: E402
from gateway.openai_checks import check_openai_request  # noqa: E402
from gateway.v2 import check_infer_request  # noqa: E402

V2_SCHEMA = {
    "type": "object", "required": ["inputs"],
    "properties": {"inputs": {"type": "array", "minItems": 1, "maxItems": 1, "items": {
        "type": "object", "required": ["name", "datatype", "shape", "data"],
        "properties": {
            "name": {"const": "input"}, "datatype": {"enum": ["FP32"]},
            "shape": {"type": "array", "items": {"type": "integer", "minimum": 1}},
            "data": {"type": "array", "items": {"type": "number", "minimum": 0, "maximum": 16}},
        }}}},
}
CHAT_SCHEMA = {
    "type": "object", "required": ["model", "messages"],
    "properties": {
        "model": {"type": "string", "maxLength": 64},
        "messages": {"type": "array", "minItems": 1, "maxItems": 64, "items": {
            "type": "object", "required": ["role", "content"],
            "properties": {"role": {"enum": ["system", "user", "assistant"]}, "content": {"type": "string", "maxLength": 32768}}}},
        "max_tokens": {"type": "integer", "minimum": 1, "maximum": 4096},
        "temperature": {"type": "number", "minimum": 0, "maximum": 2},
        "stream": {"type": "boolean"},
    },
}


def v2_body(n: int) -> bytes:
    rng = random.Random(n)
    return orjson.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, n],
                                     "data": [round(rng.uniform(0, 16), 4) for _ in range(n)]}]})


CHAT_BODY = orjson.dumps({
    "model": "chat", "max_tokens": 256, "temperature": 0.2,
    "messages": [
        {"role": "system", "content": "You are a concise assistant. Answer in one paragraph."},
        {"role": "user", "content": "Summarise the attached incident report:\n\n" + "The gateway refused a request. " * 20},
        {"role": "assistant", "content": "The gateway refused a malformed request with a 400."},
        {"role": "user", "content": "Which \"rule\" fired, and why?"},
    ],
})


def _stdlib_strict(body: bytes) -> Any:
    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in items:
            if k in out:
                raise ValueError("duplicate key")
            out[k] = v
        return out

    def constant(name: str) -> Any:
        raise ValueError(name)

    return json.loads(body.decode("utf-8"), object_pairs_hook=pairs, parse_constant=constant)


def per_call(fn: Callable[[], Any], repeat: int) -> float:
    """Seconds per call: best of ``repeat`` runs of an auto-sized loop."""
    timer = timeit.Timer(fn)
    number, _ = timer.autorange()
    return min(timer.repeat(repeat=repeat, number=number)) / number


def us(seconds: float) -> str:
    return f"{seconds * 1e6:9.1f} us"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()

    validators: dict[str, Callable[[dict[str, Any]], Callable[[Any], Any]]] = {
        "fastjsonschema": fastjsonschema.compile,
        "jsonschema": lambda s: jsonschema.Draft202012Validator(s).validate,
        "jsonschema_rs": lambda s: jsonschema_rs.validator_for(s, offline=True).validate,
    }
    cases = [
        ("v2, 64 floats", v2_body(64), V2_SCHEMA, lambda doc: check_infer_request(doc)),
        ("v2, 784 floats", v2_body(784), V2_SCHEMA, lambda doc: check_infer_request(doc)),
        ("openai chat", CHAT_BODY, CHAT_SCHEMA, lambda doc: check_openai_request("/v1/chat/completions", doc)),
    ]
    r = args.repeat
    for title, body, schema, protocol in cases:
        doc = jsonsafe.parse(body)
        print(f"\n== {title} ({len(body)} bytes) ==")
        t_orjson = per_call(lambda: orjson.loads(body), r)
        t_safe = per_call(lambda: jsonsafe.parse(body), r)
        t_stdlib = per_call(lambda: _stdlib_strict(body), r)
        t_protocol = per_call(lambda: protocol(doc), r)
        print(f"  parse   orjson.loads only          {us(t_orjson)}   (no duplicate-key or depth checks)")
        print(f"  parse   jsonsafe.parse (chosen)    {us(t_safe)}")
        print(f"  parse   json + pairs hook          {us(t_stdlib)}   (the alternative, {t_stdlib / t_safe:.1f}x slower)")
        print(f"  protocol checks                    {us(t_protocol)}")
        print(f"  {'validator':<16} {'schema only':>12} {'parse+protocol+schema':>24}")
        for name, compile_ in validators.items():
            check = compile_(schema)
            check(doc)  # warm up and prove the body is valid for every validator
            t_schema = per_call(lambda: check(doc), r)

            def whole(check: Callable[[Any], Any] = check) -> None:
                parsed = jsonsafe.parse(body)
                protocol(parsed)
                check(parsed)

            t_whole = per_call(whole, r)
            mark = "  <- chosen" if name == "jsonschema_rs" else ""
            print(f"  {name:<16} {us(t_schema):>12} {us(t_whole):>24}{mark}")

    print("\n== hostile bodies (one refusal each, wall time) ==")
    hostile = {
        "10,000-level nesting": b"[" * 10_000 + b"]" * 10_000,
        "10,000-level object nesting": b'{"a":' * 10_000 + b"1" + b"}" * 10_000,
        "1,000,001-element array": b"[" + b",".join([b"0"] * 1_000_001) + b"]",
        "duplicate key behind a scalar": b'{"a":[1,2,{"b":1,"b":2}]}',
        "NaN": b'{"a":NaN}',
    }
    for label, body in hostile.items():
        start = time.perf_counter()
        try:
            jsonsafe.parse(body)
            outcome = "ACCEPTED (bug)"
        except jsonsafe.MalformedJson as exc:
            outcome = f"400 {exc.reason}"
        elapsed = time.perf_counter() - start
        print(f"  {label:<32} {len(body):>9} bytes  {elapsed * 1e3:8.2f} ms  {outcome}")


if __name__ == "__main__":
    main()
