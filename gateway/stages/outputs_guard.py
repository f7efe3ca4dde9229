"""Refuse, before the model runs, a request that asks a hardened answer for more than hardening gives.

A v2 request may ask each output for ``parameters``: Triton's ``classification:
N`` turns a score tensor into "score:index:label" strings, which would carry
every class's score past ``label_only`` as a second, non-float output. For a
caller an ``outputs`` entry applies to, any output parameter other than
``binary_data`` (how the tensor travels, not what it says) is refused with
400. Runs right after authorise, so a refused request costs no quota and no
model time. The entry is chosen exactly as the harden stage chooses it
(``Harden.choose``), so the two never disagree about who is hardened.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import InvalidRequest
from ..pipeline import RequestContext, RouteKind
from .harden import Harden, is_noop

if TYPE_CHECKING:
    from ..services import PolicySource

ALLOWED_OUTPUT_PARAMETERS = frozenset({"binary_data"})


class OutputsGuard:
    name = "outputs_guard"

    def __init__(self, policy: PolicySource, harden: Harden) -> None:
        self._policy = policy
        self._harden = harden

    async def __call__(self, ctx: RequestContext) -> None:
        route = ctx.route
        if route is None or route.kind is not RouteKind.V2_INFER:
            return
        body = ctx.json
        outputs = body.get("outputs") if isinstance(body, dict) else None
        if not isinstance(outputs, list) or not outputs:
            return
        asked = sorted({str(k) for o in outputs if isinstance(o, dict) and isinstance(o.get("parameters"), dict)
                        for k in o["parameters"] if k not in ALLOWED_OUTPUT_PARAMETERS})
        if not asked:
            return
        document = self._policy.document
        if document is None or not document.outputs:
            return
        chosen = self._harden.choose(ctx, document)
        if chosen is not None and not is_noop(chosen[1]):
            raise InvalidRequest(f"output parameter {asked[0][:40]!r} is not allowed for this model: answers are hardened "
                                 "(only binary_data may be set)")
