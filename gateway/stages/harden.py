"""Output hardening: answer with less than the model knows, so callers cannot clone it.

A full probability vector per query is what model-extraction attacks feed on:
with enough of them a copy can be trained that matches the original. The
policy file's ``outputs`` section says, per role/subject and model, how much
of the score tensor a caller gets: the ``top_k`` best classes, only the label
(``label_only``), scores rounded to ``round_decimals``, and Laplace noise of
scale 1/``noise_epsilon`` added before ranking and rounding.

Runs after the backend, on allowed v2 ``infer`` answers that are not streamed.
The most specific matching rule applies, by the rule quotas use too
(:mod:`gateway.specificity`): an entry naming the subject beats one naming a
role, which beats a wildcard; among equals, the more specific model pattern,
then the earlier entry. If a rule applies but the answer cannot
be rewritten, the answer is withheld (502): hardening fails closed.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson

from ..errors import BackendError
from ..pipeline import BackendResponse, RequestContext, RouteKind
from ..specificity import MostSpecific

if TYPE_CHECKING:
    from ..metrics import Metrics
    from ..policy.document import OutputRule
    from ..services import PolicySource, Services

FLOAT_TYPES = frozenset({"FP16", "BF16", "FP32", "FP64"})


def build(services: Services) -> Harden | None:
    if services.policy is None:
        return None
    return Harden(services.policy, services.metrics)


# headers that describe the upstream's bytes, not the rewritten answer
_REWRITTEN = frozenset({"content-length", "content-encoding", "etag", "content-type"})


def rule_id(rule: OutputRule, index: int) -> str:
    return rule.id or f"outputs[{index}]"


def select(rules: list[OutputRule], subject: str | None, roles: tuple[str, ...] | list[str],
           model: str, compiled: MostSpecific | None = None) -> tuple[int, OutputRule] | None:
    """The (index, rule) that applies to ``subject`` with ``roles`` on ``model``, or None.

    ``compiled`` is ``MostSpecific(rules)`` kept by the caller, so the hot path
    does not recompile the patterns per request.
    """
    index = (compiled or MostSpecific(rules)).index(subject, roles, model)
    return None if index is None else (index, rules[index])


def is_noop(rule: OutputRule) -> bool:
    return rule.top_k is None and not rule.label_only and rule.round_decimals is None and rule.noise_epsilon is None


def harden_scores(scores: np.ndarray, rule: OutputRule, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray | None]:
    """(top-k indices int64 [n, k], top-k scores [n, k] or None for label_only) from scores [n, c]."""
    values = scores.astype(np.float64, copy=True)
    if rule.noise_epsilon is not None:
        values += rng.laplace(0.0, 1.0 / rule.noise_epsilon, size=values.shape)
    classes = values.shape[1]
    k = 1 if rule.label_only else min(rule.top_k or classes, classes)
    order = np.argsort(-values, axis=1, kind="stable")[:, :k]  # ties: the lower class index first
    if rule.label_only:
        return order.astype(np.int64), None
    top = np.take_along_axis(values, order, axis=1)
    if rule.round_decimals is not None:
        top = np.round(top, rule.round_decimals)
    return order.astype(np.int64), top


class Harden:
    name = "harden"

    def __init__(self, policy: PolicySource, metrics: Metrics | None = None, *, seed: int | None = None) -> None:
        self._policy = policy
        self._metrics = metrics
        self._rng = np.random.default_rng(seed)  # seeded from OS entropy unless a test fixes it
        self._outputs: list[OutputRule] | None = None  # the outputs section compiled below
        self._compiled: MostSpecific | None = None

    async def __call__(self, ctx: RequestContext, response: BackendResponse) -> BackendResponse:
        if response.stream is not None or not 200 <= response.status < 300:
            return response
        route = ctx.route
        if route is None or route.kind is not RouteKind.V2_INFER or ctx.decision is None or not ctx.decision.allowed:
            return response
        document = self._policy.document
        if document is None or not document.outputs or ctx.model_name is None:
            return response
        identity = ctx.identity
        if document.outputs is not self._outputs or self._compiled is None:  # a reload swapped the document
            self._compiled, self._outputs = MostSpecific(document.outputs), document.outputs
        chosen = select(document.outputs, identity.subject if identity else None, ctx.roles, ctx.model_name,
                        self._compiled)
        if chosen is None or is_noop(chosen[1]):
            return response
        index, rule = chosen
        payload = response.json if isinstance(response.json, dict) else None
        if payload is None:
            try:
                payload = orjson.loads(response.body or b"")
            except orjson.JSONDecodeError:
                raise BackendError("the model's answer could not be hardened (not JSON)") from None
        response.json, wire = self._rewrite(payload, rule)
        response.body = orjson.dumps(wire, option=orjson.OPT_SERIALIZE_NUMPY)
        response.content_type = "application/json"
        response.headers = [(k, v) for k, v in response.headers if k.lower() not in _REWRITTEN]
        if self._metrics is not None:
            self._metrics.hardened.labels(ctx.model_name, rule_id(rule, index)).inc()
        return response

    def _rewrite(self, payload: Any, rule: OutputRule) -> tuple[dict[str, Any], dict[str, Any]]:
        """(answer with plain lists, the same answer with numpy arrays for the body) after hardening."""
        outputs = payload.get("outputs") if isinstance(payload, dict) else None
        if not isinstance(outputs, list) or not outputs:
            raise BackendError("the model's answer could not be hardened (no v2 outputs)")
        is_score = [isinstance(o, dict) and o.get("datatype") in FLOAT_TYPES for o in outputs]
        if not any(is_score):
            raise BackendError("the model's answer could not be hardened (no score tensor)")
        several = sum(is_score) > 1
        plain: list[Any] = []
        wire: list[Any] = []
        for out, score in zip(outputs, is_score):
            if not score:
                plain.append(out)
                wire.append(out)
                continue
            prefix = f"{out.get('name', 'output')}_" if several else ""
            indices, top = harden_scores(_matrix(out), rule, self._rng)
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
        return {**payload, "outputs": plain}, {**payload, "outputs": wire}


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
