"""Output hardening: answer with less than the model knows, so callers cannot clone it.

A full probability vector per query is what model-extraction attacks feed on:
with enough of them a copy can be trained that matches the original. The
policy file's ``outputs`` section says, per role/subject and model, how much
of the score tensor a caller gets: the ``top_k`` best classes, only the label
(``label_only``), scores rounded to ``round_decimals``, and Laplace noise of
scale 1/``noise_epsilon`` added before ranking and rounding.

Hardening that holds (the holes it closes are measured in issue 14):

* the answer carries the hardened tensors only: every other output (a second
  score tensor's raw twin, Triton's ``classification`` strings, an embedding)
  is dropped unless the entry lists it in ``keep``; a request asking for output
  ``parameters`` is refused before the model runs (``outputs_guard``);
* noise is repeatable (``gateway.noise``): the same caller asking the same row
  gets the same draw, on every replica, so asking 4,096 times averages nothing;
* an entry may carry ``when`` (``gateway.policy.outputs``): e.g. degrade a
  caller whose monitor is in alarm.

Runs after the backend, on allowed v2 ``infer`` answers that are not streamed,
JSON or binary (``gateway.v2_binary`` decodes, calls the same rewrite, and
re-encodes). It is also where monitors see each answer *before* hardening
(``gateway.monitors``). If a rule applies but the answer cannot be rewritten,
the answer is withheld (502): hardening fails closed.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np
import orjson

from .. import v2_binary
from ..errors import BackendError
from ..noise import NoiseKey
from ..pipeline import BackendResponse, RequestContext, RouteKind
from ..policy.compile import compile_outputs
from ..policy.enforcer import make_facts
from ..policy.outputs import OutputsChoice
from ..policy.truth import Alarms, Facts
from ..specificity import MostSpecific
from ..v2 import DATATYPES
from .authorize import request_facts

if TYPE_CHECKING:
    from ..metrics import Metrics
    from ..monitors import Monitors, Watch
    from ..policy.document import OutputRule, PolicyDocument
    from ..services import PolicySource, Services

FLOAT_TYPES = frozenset({"FP16", "BF16", "FP32", "FP64"})
_FP32 = DATATYPES["FP32"]  # the hardened scores' datatype, and its range
# Noise draws for a score tensor: (output name, rows, classes) -> Laplace noise [rows, classes], or None
NoiseFor = Callable[[str, np.ndarray], "np.ndarray | None"]


def build(services: Services) -> Harden | None:
    if services.policy is None:
        return None
    hardening = getattr(services.config, "hardening", None)
    return Harden(services.policy, services.metrics,
                  noise_key=NoiseKey.from_env(getattr(hardening, "noise_key_env", None)))


# headers that describe the upstream's bytes, not the rewritten answer
_REWRITTEN = frozenset({"content-length", "content-encoding", "etag", "content-type"})


def rule_id(rule: OutputRule, index: int) -> str:
    return rule.id or f"outputs[{index}]"


def select(rules: list[OutputRule], subject: str | None, roles: tuple[str, ...] | list[str],
           model: str, compiled: MostSpecific | None = None) -> tuple[int, OutputRule] | None:
    """The (index, rule) that applies to ``subject`` with ``roles`` on ``model`` among entries without
    ``when``, or None. ``compiled`` is ``MostSpecific(rules)`` kept by the caller."""
    index = (compiled or MostSpecific(rules)).index(subject, roles, model)
    return None if index is None else (index, rules[index])


def is_noop(rule: OutputRule) -> bool:
    return rule.top_k is None and not rule.label_only and rule.round_decimals is None and rule.noise_epsilon is None


def harden_scores(scores: np.ndarray, rule: OutputRule,
                  noise: np.ndarray | np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """(top-k indices int64 [n, k], top-k scores [n, k] or None for label_only) from scores [n, c].

    ``noise``: the draws to add (repeatable, from ``gateway.noise``), or a generator to draw from.
    """
    values = scores.astype(np.float64, copy=True)
    if rule.noise_epsilon is not None:
        if isinstance(noise, np.random.Generator):
            values += noise.laplace(0.0, 1.0 / rule.noise_epsilon, size=values.shape)
        elif noise is not None:
            values += noise
    classes = values.shape[1]
    k = 1 if rule.label_only else min(rule.top_k or classes, classes)
    order = np.argsort(-values, axis=1, kind="stable")[:, :k]  # ties: the lower class index first
    if rule.label_only:
        return order.astype(np.int64), None
    # the hardened scores are FP32: a model's score past that range is clamped to it, keeping the order, so an
    # answer never carries inf (null in JSON), and rounding (x * 10**decimals) cannot overflow
    top = np.clip(np.take_along_axis(values, order, axis=1), _FP32.low, _FP32.high)
    if rule.round_decimals is not None:
        top = np.round(top, rule.round_decimals)
    return order.astype(np.int64), top


def harden_outputs(outputs: Any, rule: OutputRule, noise_for: NoiseFor | None = None,
                   matrices: dict[int, np.ndarray] | None = None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The hardened outputs of one v2 answer: (with plain lists, with numpy arrays for the wire).

    ``outputs`` are v2 output objects (``name``, ``datatype``, ``shape``, ``data`` as a list or a
    flat array, as JSON and binary answers carry them). Every float tensor not listed in ``keep`` is
    hardened; outputs listed in ``keep`` pass unchanged; everything else is dropped. ``matrices``: score
    tensors already converted (by ``id`` of their output object), so no tensor is converted twice.
    """
    if not isinstance(outputs, list) or not outputs:
        raise BackendError("the model's answer could not be hardened (no v2 outputs)")
    keep = set(rule.keep)
    is_score = [isinstance(o, dict) and o.get("datatype") in FLOAT_TYPES and o.get("name") not in keep
                for o in outputs]
    if not any(is_score):
        raise BackendError("the model's answer could not be hardened (no score tensor)")
    several = sum(is_score) > 1
    plain: list[dict[str, Any]] = []
    wire: list[dict[str, Any]] = []
    for out, score in zip(outputs, is_score):
        if not score:
            if isinstance(out, dict) and out.get("name") in keep:
                data = out.get("data")
                plain.append({**out, "data": data.tolist()} if isinstance(data, np.ndarray) else out)
                wire.append(out)
            continue
        name = str(out.get("name", "output"))
        prefix = f"{name}_" if several else ""
        matrix = matrices.get(id(out)) if matrices else None
        if matrix is None:
            matrix = _matrix(out)
        noise = noise_for(name, matrix) if (noise_for is not None and rule.noise_epsilon is not None) else None
        indices, top = harden_scores(matrix, rule, noise)
        n, k = indices.shape
        entry = {"name": f"{prefix}top_k_indices", "datatype": "INT64", "shape": [n, k]}
        flat_indices = indices.reshape(-1)
        plain.append({**entry, "data": flat_indices.tolist()})
        wire.append({**entry, "data": flat_indices})
        if top is not None:
            entry = {"name": f"{prefix}top_k_scores", "datatype": "FP32", "shape": [n, k]}
            if rule.round_decimals is not None:  # rounded doubles print as written: 0.97, not 0.9700000286
                values = top.reshape(-1).tolist()
                plain.append({**entry, "data": values})
                wire.append({**entry, "data": values})
            else:
                values32 = top.astype(np.float32).reshape(-1)
                plain.append({**entry, "data": values32.tolist()})
                wire.append({**entry, "data": values32})
    return plain, wire


class Harden:
    name = "harden"

    def __init__(self, policy: PolicySource, metrics: Metrics | None = None, *, seed: int | None = None,
                 noise_key: NoiseKey | None = None, monitors: Monitors | None = None) -> None:
        self._policy = policy
        self._metrics = metrics
        # a fixed seed (tests) is a fixed key: repeatable across instances, like a configured key
        self.noise_key = noise_key or (NoiseKey(seed.to_bytes(8, "little", signed=True), True) if seed is not None
                                       else NoiseKey.from_env(None))
        self.monitors = monitors  # set by the gateway: the monitors see each answer before hardening
        self._document: PolicyDocument | None = None
        self._choice: OutputsChoice | None = None

    def choice(self, document: PolicyDocument) -> OutputsChoice:
        """The compiled ``outputs`` section of ``document`` (recompiled when a reload swaps it)."""
        if document is not self._document or self._choice is None:
            self._choice = OutputsChoice(document.outputs, compile_outputs(document))
            self._document = document
        return self._choice

    def choose(self, ctx: RequestContext, document: PolicyDocument) -> tuple[int, OutputRule] | None:
        """The outputs entry that governs ``ctx`` (``when`` read with the request's facts and alarms)."""
        if not document.outputs or ctx.model_name is None:
            return None
        identity = ctx.identity
        subject = identity.subject if identity is not None else None
        return self.choice(document).select(subject, ctx.roles, ctx.model_name, lambda: facts_of(ctx))

    async def __call__(self, ctx: RequestContext, response: BackendResponse) -> BackendResponse:
        if response.stream is not None or not 200 <= response.status < 300:
            return response
        route = ctx.route
        if route is None or route.kind is not RouteKind.V2_INFER or ctx.decision is None or not ctx.decision.allowed:
            return response
        document = self._policy.document
        model = ctx.model_name
        if document is None or model is None or not (document.outputs or document.monitors):
            return response
        identity = ctx.identity
        subject = identity.subject if identity is not None else ""
        monitors = self.monitors
        watches = monitors.watching(document, subject, ctx.roles, model) if monitors is not None else ()
        chosen = self.choose(ctx, document)
        active = chosen is not None and not is_noop(chosen[1])
        if not active and not watches:
            return response
        binary = v2_binary.answer_length(response)
        if not active:  # watched only: the monitors read the answer, which goes out as it came
            try:
                seen = v2_binary.decode_answer(response.body or b"", binary)[0] if binary is not None \
                    else (response.json if isinstance(response.json, dict) else orjson.loads(response.body or b""))
            except (BackendError, orjson.JSONDecodeError):
                return response
            self._observe(ctx, seen, watches)
            return response
        assert chosen is not None
        index, rule = chosen
        payload = response.json if isinstance(response.json, dict) and binary is None else None
        if binary is not None:  # binary tensors: decoded, hardened by the same rewrite, re-encoded binary
            v2_binary.harden_answer(response, binary, lambda decoded: self._rewrite(decoded, rule, ctx, watches))
        elif payload is None:
            try:
                payload = orjson.loads(response.body or b"")
            except orjson.JSONDecodeError:
                raise BackendError("the model's answer could not be hardened (not JSON)") from None
        if binary is None:
            response.json, wire = self._rewrite(payload, rule, ctx, watches)
            response.body = orjson.dumps(wire, option=orjson.OPT_SERIALIZE_NUMPY)
            response.content_type = "application/json"
            response.headers = [(k, v) for k, v in response.headers if k.lower() not in _REWRITTEN]
        if self._metrics is not None:
            self._metrics.hardened.labels(model, rule_id(rule, index)).inc()
        return response

    def _rewrite(self, payload: Any, rule: OutputRule, ctx: RequestContext | None = None,
                 watches: Sequence[Watch] = ()) -> tuple[dict[str, Any], dict[str, Any]]:
        """(answer with plain lists, the same answer with numpy arrays for the body) after hardening."""
        matrices: dict[int, np.ndarray] = {}
        if watches and ctx is not None:
            self._observe(ctx, payload, watches, matrices)
        outputs = payload.get("outputs") if isinstance(payload, dict) else None
        plain, wire = harden_outputs(outputs, rule, self._noise_for(ctx, rule), matrices)
        return {**payload, "outputs": plain}, {**payload, "outputs": wire}

    def _noise_for(self, ctx: RequestContext | None, rule: OutputRule) -> NoiseFor:
        identity = ctx.identity if ctx is not None else None
        subject = identity.subject if identity is not None else ""
        model = (ctx.model_name if ctx is not None else None) or ""
        inputs = ctx.validated_inputs if ctx is not None else None
        key = self.noise_key

        def draw(name: str, scores: np.ndarray) -> np.ndarray:
            rows = _row_keys(inputs, scores)
            return key.laplace(subject, model, name, rows, scores.shape[1], 1.0 / (rule.noise_epsilon or 1.0))

        return draw

    def _observe(self, ctx: RequestContext, payload: Any, watches: Sequence[Watch],
                 matrices: dict[int, np.ndarray] | None = None) -> None:
        """Hand the answer (before hardening) and the request's input rows to the monitors."""
        monitors = self.monitors
        if monitors is None or ctx.model_name is None or ctx.identity is None:
            return
        outputs = payload.get("outputs") if isinstance(payload, dict) else None
        scores = None
        if isinstance(outputs, list):
            for out in outputs:
                if isinstance(out, dict) and out.get("datatype") in FLOAT_TYPES:
                    try:
                        scores = _matrix(out)
                    except BackendError:
                        scores = None
                    if scores is not None and matrices is not None:
                        matrices[id(out)] = scores
                    break
        n = scores.shape[0] if scores is not None else None
        monitors.observe(watches, ctx.identity.subject, ctx.model_name, scores, _input_rows(ctx.validated_inputs, n))


def facts_of(ctx: RequestContext) -> Facts:
    """What an outputs entry's ``when`` reads: the caller, the model, the request, the alarms."""
    identity = ctx.identity
    labels = ctx.model.labels if ctx.model is not None else None
    return make_facts(identity.subject if identity else "", identity.roles if identity else (),
                      identity.claims if identity else {}, ctx.model_name or "", labels, request_facts(ctx),
                      Alarms(ctx.monitors))


def _input_rows(inputs: Mapping[str, np.ndarray] | None, n: int | None) -> np.ndarray | None:
    """The request's float inputs as one [n, features] matrix (inputs side by side, by name), or None."""
    if not inputs:
        return None
    parts = []
    for name in sorted(inputs):
        flat = np.asarray(inputs[name]).reshape(-1)
        rows = n if n is not None else None
        if rows is None:
            return flat.reshape(1, -1) if len(inputs) == 1 else None
        if rows == 0 or flat.size % rows:
            return None
        parts.append(flat.reshape(rows, -1))
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)


def _row_keys(inputs: Mapping[str, np.ndarray] | None, scores: np.ndarray) -> list[bytes]:
    """What identifies each answered row for repeatable noise: its input bytes; without them, its
    scores rounded to 5 decimals (so a batch-size-dependent last bit does not change the draw)."""
    rows = _input_rows(inputs, scores.shape[0])
    if rows is None:
        rows = np.round(scores, 5)
    matrix = np.ascontiguousarray(rows, dtype=np.float64)
    return [row.tobytes() for row in matrix]


def _matrix(out: dict[str, Any]) -> np.ndarray:
    """A score tensor as [n, classes]; leading dimensions fold into n."""
    shape, data = out.get("shape"), out.get("data")
    try:
        values = np.asarray(data, dtype=np.float64).reshape(-1)
        dims = [int(d) for d in shape]  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise BackendError("the model's answer could not be hardened (malformed tensor)") from None
    if not dims or any(d < 1 for d in dims) or math.prod(dims) != values.size or not np.isfinite(values).all():
        raise BackendError("the model's answer could not be hardened (tensor shape and data disagree)")
    return values.reshape(-1, dims[-1])
