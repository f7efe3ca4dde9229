"""The validate stage: nothing malformed reaches a model.

Runs after authorisation and quota, on every ``infer`` request, and checks the
parsed body (``ctx.json``, from the body stage's hardened parser) in two layers:

1. the protocol's own rules (``gateway.v2`` for Open Inference Protocol bodies,
   ``gateway.openai_checks`` for ``/v1/*``), which a JSON Schema cannot express
   (shape product = number of values, declared inputs);
2. the model's own JSON Schema (``models.X.schema``, Draft 2020-12 unless the
   file says otherwise), compiled once at start-up.

The backend sends upstream ``ctx.body``, the exact bytes that were validated,
never a second parse of something else. For a v2 request the checked
floating-point inputs are handed on as ``ctx.validated_inputs`` (already
converted: a backend that runs the model locally need not convert them again).

Validator choice (``bench/bench_validation.py``, schema check alone, per request,
on a busy 2-core machine): for the 64-float v2 body jsonschema_rs (Rust) takes
~2-4 us, fastjsonschema (generated Python) ~13-23 us and python-jsonschema
~450-620 us; for a 784-float body ~5-47 us, ~100-250 us and ~4.6-10 ms. Beyond
speed, fastjsonschema implements only drafts 4, 6 and 7 (no ``prefixItems``,
``unevaluatedProperties``, ``dependentRequired``), so a Draft 2020-12 schema
would be silently half-checked; python-jsonschema is complete but ~100x slower.
jsonschema_rs is the only one both complete for 2020-12 and cheap, and its
regex engine bounds backtracking, so a schema ``pattern`` is no
ReDoS lever. Remote ``$ref``s are never fetched (``offline=True``): a schema
that needs one is a start-up error, not a network call on a hot path.

Error messages name the JSON pointer of the failing value and the rule
(``/inputs/0/data/3: must be number``). They are built from the schema side of
the error only: client-supplied text (a property name, a value) is never
echoed, or cut to 40 characters.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import jsonschema_rs

from .. import jsonsafe
from ..config import TensorSpec
from ..errors import ConfigError, InvalidRequest
from ..llm.surfaces import surface_for
from ..openai_checks import check_openai_request
from ..pipeline import RequestContext, RouteKind
from ..v2 import ALL_DATATYPES, RequestViolation, check_infer_request
from ..v2_binary import BinaryInputs

if TYPE_CHECKING:
    from ..services import Services

DeclaredInputs = Callable[[str], "Sequence[TensorSpec] | None"]


def read_schema(path: Path) -> Any:
    """The JSON Schema document in ``path``, or ``ConfigError`` naming the file (and line)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read JSON Schema: {exc}", file=str(path)) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"not valid JSON: {exc.msg} (column {exc.colno})", file=str(path), line=exc.lineno) from None


def compile_schema(path: Path) -> Callable[[Any], None]:
    """A function that raises ``RequestViolation`` for a document ``path``'s schema rejects."""
    schema = read_schema(path)
    if type(schema) is not dict and type(schema) is not bool:
        raise ConfigError("a JSON Schema must be an object or a boolean", file=str(path))
    try:
        jsonschema_rs.meta.validate(schema)
    except jsonschema_rs.ValidationError as exc:
        where = _pointer(exc.instance_path) or "(root)"
        raise ConfigError(f"not a valid JSON Schema at {where}: {_first_line(exc.message)}", file=str(path)) from None
    except Exception as exc:  # an unknown "$schema" draft, for one
        raise ConfigError(f"not a valid JSON Schema: {_first_line(str(exc))}", file=str(path)) from None
    try:
        validator = jsonschema_rs.validator_for(schema, offline=True, validate_formats=True, mask="<value>")
    except Exception as exc:  # unresolvable $ref, bad regex, ...
        raise ConfigError(f"cannot compile JSON Schema: {_first_line(str(exc))}", file=str(path)) from None

    def validate(document: Any) -> None:
        try:
            validator.validate(document)
        except jsonschema_rs.ValidationError as exc:
            raise RequestViolation(describe(exc), "schema") from None

    return validate


def describe(error: jsonschema_rs.ValidationError) -> str:
    """``/pointer: rule`` for a schema violation, echoing no client-supplied text beyond 40 characters."""
    kind = error.kind
    name = getattr(kind, "name", "")
    info = kind.as_dict()
    path = list(error.instance_path)
    if name == "required":
        path.append(str(info.get("property", "")))
        rule = "is required"
    else:
        describe: Callable[[dict[str, Any], Any], str] = _RULES.get(name, _fallback)
        rule = describe(info, error)
    return f"{_pointer(path) or '(root)'}: {rule}"


def _fallback(info: dict[str, Any], error: jsonschema_rs.ValidationError) -> str:
    keyword = next((str(p) for p in reversed(error.schema_path) if isinstance(p, str)), "schema")
    return f"breaks the {keyword!r} rule"


def _cut(value: Any, limit: int = 40) -> str:
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"), default=str)
    return text if len(text) <= limit else text[:limit] + "..."


def _first_unexpected(info: dict[str, Any], what: str) -> str:
    unexpected = info.get("unexpected") or []
    return f"{what} {_cut(str(unexpected[0]))!r} is not allowed" if unexpected else f"has {what}s that are not allowed"


_RULES: dict[str, Callable[[dict[str, Any], Any], str]] = {
    "type": lambda i, e: "must be " + " or ".join(i.get("types") or ["of another type"]),
    "const": lambda i, e: f"must equal {_cut(i.get('expected_value'))}",
    "enum": lambda i, e: f"must be one of {_cut(i.get('options'), 80)}",
    "minimum": lambda i, e: f"must be >= {i.get('limit')}",
    "maximum": lambda i, e: f"must be <= {i.get('limit')}",
    "exclusiveMinimum": lambda i, e: f"must be > {i.get('limit')}",
    "exclusiveMaximum": lambda i, e: f"must be < {i.get('limit')}",
    "multipleOf": lambda i, e: f"must be a multiple of {i.get('multiple_of')}",
    "minLength": lambda i, e: f"must be at least {i.get('limit')} characters long",
    "maxLength": lambda i, e: f"must be at most {i.get('limit')} characters long",
    "minItems": lambda i, e: f"must have at least {i.get('limit')} items",
    "maxItems": lambda i, e: f"must have at most {i.get('limit')} items",
    "minProperties": lambda i, e: f"must have at least {i.get('limit')} properties",
    "maxProperties": lambda i, e: f"must have at most {i.get('limit')} properties",
    "uniqueItems": lambda i, e: "must not contain duplicate items",
    "pattern": lambda i, e: f"must match the pattern {_cut(i.get('pattern'), 60)}",
    "format": lambda i, e: f"must be a valid {i.get('format')}",
    "additionalProperties": lambda i, e: _first_unexpected(i, "property"),
    "unevaluatedProperties": lambda i, e: _first_unexpected(i, "property"),
    "unevaluatedItems": lambda i, e: "has items that are not allowed",
    "additionalItems": lambda i, e: "has items that are not allowed",
    "falseSchema": lambda i, e: (
        "has properties that are not allowed" if list(e.schema_path)[-1:] == ["additionalProperties"] else "is not allowed"
    ),
    "not": lambda i, e: "must not match the 'not' schema",
    "anyOf": lambda i, e: "must match at least one of the 'anyOf' schemas",
    "oneOf": lambda i, e: "must match exactly one of the 'oneOf' schemas "
    + ("(it matches none)" if all(i.get("context") or [[]]) else "(it matches several)"),
    "contains": lambda i, e: "must contain an item that matches the 'contains' schema",
    "propertyNames": lambda i, e: "has a property name that breaks the 'propertyNames' rule",
    "backtrackLimitExceeded": lambda i, e: "is too costly to match against the schema's pattern",
}


def _pointer(parts: Sequence[Any]) -> str:
    """RFC 6901 pointer; client-supplied keys are cut to 40 characters."""
    out = []
    for part in parts:
        text = _cut(str(part)) if isinstance(part, str) else str(part)
        out.append("/" + text.replace("~", "~0").replace("/", "~1"))
    return "".join(out)


def _first_line(text: str) -> str:
    line = text.strip().splitlines()[0] if text.strip() else "unknown error"
    return line if len(line) <= 200 else line[:200] + "..."


@dataclass(frozen=True, slots=True)
class ModelRules:
    """What validation knows about one model, resolved at start-up."""

    schema: Callable[[Any], None] | None
    inputs: tuple[TensorSpec, ...] | None
    max_tokens: int | None


class Validate:
    """The pipeline stage. Holds only start-up state; safe to share across requests."""

    name = "validate"

    def __init__(self, models: dict[str, ModelRules], failures: Any, declared_inputs: DeclaredInputs | None = None) -> None:
        self._models = models
        self._failures = failures  # metrics.validation_failures (labels: model, reason)
        self._declared_inputs = declared_inputs

    async def __call__(self, ctx: RequestContext) -> None:
        route = ctx.route
        if route is None or route.action != "infer":
            return
        model = ctx.model_name or ""
        rules = self._models.get(model)
        try:
            document = ctx.json
            inputs: dict[str, Any] | None = None
            if route.kind is RouteKind.V2_INFER:
                inputs = {}
                header = ctx.binary_header  # binary tensors: their bytes follow the JSON header
                binary = None if header is None else BinaryInputs(memoryview(ctx.body)[header:])
                check_infer_request(document, self._declared(model, rules), inputs, binary)
            elif route.kind is RouteKind.OPENAI or route.kind is RouteKind.OLLAMA:
                surface = surface_for(ctx.path)  # every LLM API family: its own checks (gateway.llm.surfaces)
                cap = rules.max_tokens if rules else None
                if surface is not None:
                    surface.check(document, cap)
                else:
                    check_openai_request(ctx.path, document, max_tokens_cap=cap)
            elif route.kind is RouteKind.RESPONSE_ID:
                return  # no body of the caller's to check: the id was checked against its owner
            if rules is not None and rules.schema is not None:
                if document is None and not route.json_body:
                    # A raw route's body is not parsed by the body stage; a schema makes it JSON.
                    document = ctx.json = jsonsafe.parse(ctx.body)
                rules.schema(document)
        except InvalidRequest as exc:
            self._failures.labels(model, getattr(exc, "reason", "invalid")).inc()
            raise
        ctx.validated_inputs = inputs

    def _declared(self, model: str, rules: ModelRules | None) -> Sequence[TensorSpec] | None:
        if self._declared_inputs is not None:
            declared = self._declared_inputs(model)
            if declared is not None:
                return declared
        return rules.inputs if rules else None


def build(services: Services, declared_inputs: DeclaredInputs | None = None) -> Validate:
    """Compile every model's schema once; a bad schema or input declaration is a ``ConfigError``.

    ``declared_inputs(model)`` lets a backend that knows its inputs (the local
    runner) declare them; when it answers None, ``models.X.inputs`` applies.
    """
    config = services.config
    models: dict[str, ModelRules] = {}
    for name, model in config.models.items():
        inputs = tuple(model.inputs) if model.inputs is not None else None
        if inputs is not None:
            _check_declared(name, inputs, config)
        schema = compile_schema(model.schema) if model.schema is not None else None
        models[name] = ModelRules(schema=schema, inputs=inputs, max_tokens=model.max_tokens)
    return Validate(models, services.metrics.validation_failures, declared_inputs)


def _check_declared(name: str, inputs: Sequence[TensorSpec], config: Any) -> None:
    seen: set[str] = set()
    for i, spec in enumerate(inputs):
        key = f"models.{name}.inputs[{i}]"
        problem = None
        if spec.datatype not in ALL_DATATYPES:
            problem = ("datatype", f"unknown datatype {spec.datatype!r}; one of {', '.join(ALL_DATATYPES)}")
        elif any(type(d) is not int or d < -1 for d in spec.shape):
            problem = ("shape", "dimensions must be integers >= 0, or -1 for any size")
        elif spec.name in seen:
            problem = ("name", f"duplicate input name {spec.name!r}")
        seen.add(spec.name)
        if problem:
            source = getattr(config, "source", None)
            if source is not None:
                raise source.error(f"{key}.{problem[0]}", problem[1])
            raise ConfigError(problem[1], key=f"{key}.{problem[0]}")
