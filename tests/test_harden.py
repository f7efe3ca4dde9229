"""Output hardening: which rule applies to whom, and what each knob does to the answer."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from gateway.errors import BackendError
from gateway.metrics import Metrics
from gateway.pipeline import BackendResponse, Decision, Identity, RequestContext, Route, RouteKind
from gateway.request import BufferedRequest
from gateway.stages.harden import Harden, select
from tests.quota_support import Policy, outputs_policy as policy

SCORES = [0.05, 0.6, 0.1, 0.25, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0,
          0.9, 0.01, 0.02, 0.03, 0.04, 0.0, 0.0, 0.0, 0.0, 0.0]


def ctx_for(subject: str = "alice", roles: tuple[str, ...] = ("analyst",), model: str = "digits",
            kind: RouteKind = RouteKind.V2_INFER, allowed: bool = True) -> RequestContext:
    ctx = RequestContext(BufferedRequest("POST", f"/v2/models/{model}/infer"), "rid", 0.0)
    ctx.route = Route(kind, "infer", model, True)
    ctx.model_name = model
    ctx.identity = Identity(subject, roles, {}, "jwt")
    ctx.decision = Decision(allowed, "r", roles)
    return ctx


def answer(scores: list[float] = SCORES, shape: list[int] | None = None, with_json: bool = True) -> BackendResponse:
    doc = {"model_name": "digits", "id": "q", "outputs": [{"name": "output", "datatype": "FP32",
                                                          "shape": shape or [2, 10], "data": scores}]}
    return BackendResponse(200, headers=[("Content-Length", "999")], body=orjson.dumps(doc),
                           json=doc if with_json else None)


def outputs_of(response: BackendResponse) -> dict[str, Any]:
    body = orjson.loads(response.body or b"")
    assert response.json is not None and len(body["outputs"]) == len(response.json["outputs"])
    for wire, plain in zip(body["outputs"], response.json["outputs"]):  # body and json agree after rewriting
        assert wire["data"] == pytest.approx(plain["data"], rel=1e-6)
        assert {k: v for k, v in wire.items() if k != "data"} == {k: v for k, v in plain.items() if k != "data"}
    return {o["name"]: o for o in body["outputs"]}


async def test_top_k_with_rounding(tmp_path: Path) -> None:
    stage = Harden(policy(tmp_path, "  - {roles: [analyst], models: [digits], top_k: 2, round_decimals: 1}\n"), Metrics())
    out = outputs_of(await stage(ctx_for(), answer()))
    assert set(out) == {"top_k_indices", "top_k_scores"}
    assert out["top_k_indices"] == {"name": "top_k_indices", "datatype": "INT64", "shape": [2, 2], "data": [1, 3, 0, 4]}
    assert out["top_k_scores"] == {"name": "top_k_scores", "datatype": "FP32", "shape": [2, 2],
                                   "data": [0.6, 0.2, 0.9, 0.0]}


@pytest.mark.parametrize("rounding", [", round_decimals: 8", ""])
async def test_scores_past_fp32_are_clamped_not_infinite(tmp_path: Path, rounding: str) -> None:
    """An FP64 answer with scores past FP32's range: the FP32 top_k_scores hold FP32's extremes in the model's
    order, never inf (JSON null) or a numpy warning (rounding multiplied 1e300 by 10**8; the cast overflowed)."""
    stage = Harden(policy(tmp_path, f"  - {{models: [digits], top_k: 3{rounding}}}\n"), Metrics())
    doc = {"model_name": "digits", "outputs": [{"name": "output", "datatype": "FP64", "shape": [1, 3],
                                                "data": [-1e300, 1e300, 0.5]}]}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = outputs_of(await stage(ctx_for(), BackendResponse(200, body=orjson.dumps(doc), json=doc)))
    fp32_max = float(np.finfo(np.float32).max)
    assert out["top_k_indices"]["data"] == [1, 2, 0]
    assert out["top_k_scores"]["data"] == pytest.approx([fp32_max, 0.5, -fp32_max], rel=1e-6)


async def test_label_only(tmp_path: Path) -> None:
    stage = Harden(policy(tmp_path, "  - {roles: [analyst], models: ['*'], label_only: true, top_k: 5}\n"))
    out = outputs_of(await stage(ctx_for(), answer()))
    assert out == {"top_k_indices": {"name": "top_k_indices", "datatype": "INT64", "shape": [2, 1], "data": [1, 0]}}


async def test_rounding_alone_sorts_all_classes(tmp_path: Path) -> None:
    stage = Harden(policy(tmp_path, "  - {models: [digits], round_decimals: 0}\n"))
    out = outputs_of(await stage(ctx_for(), answer()))
    assert out["top_k_indices"]["shape"] == [2, 10]
    assert out["top_k_scores"]["data"][:2] == [1.0, 0.0]


async def test_top_k_without_rounding_keeps_fp32_values(tmp_path: Path) -> None:
    stage = Harden(policy(tmp_path, "  - {models: [digits], top_k: 1}\n"))
    response = await stage(ctx_for(), answer())
    assert b'"data":[0.6,0.9]' in (response.body or b"")  # printed at FP32 precision, not 0.6000000238418579


async def test_noise_changes_scores_with_the_configured_scale(tmp_path: Path) -> None:
    stage = Harden(policy(tmp_path, "  - {models: [digits], noise_epsilon: 2.0, top_k: 10}\n"), seed=7)
    observed = []
    for i in range(400):  # noise is repeatable per (caller, model, row): 400 callers, 400 independent draws
        out = outputs_of(await stage(ctx_for(subject=f"caller-{i}"), answer()))
        idx, vals = out["top_k_indices"]["data"][:10], out["top_k_scores"]["data"][:10]
        by_class = dict(zip(idx, vals))
        observed.append(by_class[1] - 0.6)
    noise = np.asarray(observed)
    assert abs(noise.mean()) < 0.1
    assert 0.35 < np.abs(noise).mean() < 0.65  # Laplace(b = 1/epsilon = 0.5): mean |x| = b


async def test_noise_is_applied_before_rounding(tmp_path: Path) -> None:
    stage = Harden(policy(tmp_path, "  - {models: [digits], noise_epsilon: 1000, round_decimals: 2, top_k: 3}\n"), seed=1)
    out = outputs_of(await stage(ctx_for(), answer()))
    assert all(round(v, 2) == v for v in out["top_k_scores"]["data"])


async def test_parses_body_when_backend_gave_no_json(tmp_path: Path) -> None:
    """http v2 backends hand over bytes only."""
    stage = Harden(policy(tmp_path, "  - {models: [digits], top_k: 1}\n"))
    out = outputs_of(await stage(ctx_for(), answer(with_json=False)))
    assert out["top_k_indices"]["data"] == [1, 0]


async def test_stale_length_header_is_dropped(tmp_path: Path) -> None:
    stage = Harden(policy(tmp_path, "  - {models: [digits], top_k: 1}\n"))
    response = await stage(ctx_for(), answer())
    assert "Content-Length" not in dict(response.headers)


async def test_counts_in_metric_by_rule(tmp_path: Path) -> None:
    metrics = Metrics()
    stage = Harden(policy(tmp_path, "  - {id: analysts-top1, roles: [analyst], models: [digits], top_k: 1}\n"
                                    "  - {models: ['*'], top_k: 3}\n"), metrics)
    await stage(ctx_for(), answer())
    await stage(ctx_for(roles=("other",)), answer())
    value = metrics.registry.get_sample_value
    assert value("maas_hardened_responses_total", {"model": "digits", "rule": "analysts-top1"}) == 1
    assert value("maas_hardened_responses_total", {"model": "digits", "rule": "outputs[1]"}) == 1


@pytest.mark.parametrize("change", [
    {"kind": RouteKind.V2_METADATA},
    {"allowed": False},
    {"model": "sentiment"},
])
async def test_untouched_when_no_rule_or_not_an_allowed_infer(tmp_path: Path, change: dict[str, Any]) -> None:
    stage = Harden(policy(tmp_path, "  - {models: [digits], top_k: 1}\n"))
    original = answer()
    body = original.body
    response = await stage(ctx_for(**change), original)
    assert response.body == body


async def test_streams_and_errors_are_untouched(tmp_path: Path) -> None:
    stage = Harden(policy(tmp_path, "  - {models: ['*'], top_k: 1}\n"))
    stream = BackendResponse(200, stream=object())
    assert await stage(ctx_for(), stream) is stream
    error = BackendResponse(500, body=b'{"error": "x"}')
    assert (await stage(ctx_for(), error)).body == b'{"error": "x"}'


async def test_no_policy_document_means_untouched(tmp_path: Path) -> None:
    stage = Harden(Policy(None))
    original = answer()
    assert (await stage(ctx_for(), original)).body == original.body


async def test_a_rule_without_knobs_exempts_trusted_callers(tmp_path: Path) -> None:
    stage = Harden(policy(tmp_path, "  - {roles: [model-owner], models: [digits]}\n  - {models: ['*'], top_k: 1}\n"))
    original = answer()
    assert (await stage(ctx_for(roles=("model-owner",)), original)).body == original.body


@pytest.mark.parametrize("body", [
    b"not json",
    b'{"outputs": []}',
    b'{"outputs": [{"name": "label", "datatype": "INT64", "shape": [1], "data": [3]}]}',
    b'{"outputs": [{"name": "o", "datatype": "FP32", "shape": [2, 10], "data": [1, 2]}]}',
    b'{"outputs": [{"name": "o", "datatype": "FP32", "shape": "x", "data": [1, 2]}]}',
])
async def test_fails_closed_when_answer_cannot_be_hardened(tmp_path: Path, body: bytes) -> None:
    stage = Harden(policy(tmp_path, "  - {models: [digits], top_k: 1}\n"))
    with pytest.raises(BackendError, match="could not be hardened"):
        await stage(ctx_for(), BackendResponse(200, body=body))


async def test_other_outputs_are_dropped_and_several_score_tensors_are_prefixed(tmp_path: Path) -> None:
    """Issue 14: the answer carries the hardened tensors only (``keep`` lists exceptions)."""
    stage = Harden(policy(tmp_path, "  - {models: [digits], top_k: 1}\n"))
    doc = {"outputs": [{"name": "label", "datatype": "INT64", "shape": [1], "data": [1]},
                       {"name": "a", "datatype": "FP32", "shape": [1, 3], "data": [0.1, 0.7, 0.2]},
                       {"name": "b", "datatype": "FP64", "shape": [3], "data": [0.5, 0.2, 0.3]}]}
    out = outputs_of(await stage(ctx_for(), BackendResponse(200, body=orjson.dumps(doc), json=doc)))
    assert "label" not in out
    assert out["a_top_k_indices"]["data"] == [1] and out["b_top_k_indices"]["data"] == [0]
    assert out["b_top_k_scores"]["shape"] == [1, 1]


def test_most_specific_rule_wins(tmp_path: Path) -> None:
    doc = policy(tmp_path, "\n".join([
        "  - {id: everyone, models: ['*'], top_k: 1}",
        "  - {id: analysts-any, roles: [analyst], models: ['*'], top_k: 2}",
        "  - {id: analysts-digits, roles: [analyst], models: [digits], top_k: 3}",
        "  - {id: analysts-d-glob, roles: [analyst], models: ['dig*'], top_k: 4}",
        "  - {id: alice, subjects: [alice], models: ['*'], top_k: 5}",
        "  - {id: role-wildcard, roles: ['*'], models: [digits], top_k: 6}",
        "",
    ])).document
    assert doc is not None
    rules = doc.outputs

    def chosen(subject: str, roles: tuple[str, ...], model: str = "digits") -> str | None:
        found = select(rules, subject, roles, model)
        return found[1].id if found else None

    assert chosen("alice", ("analyst",)) == "alice"  # subject beats role
    assert chosen("bob", ("analyst",)) == "analysts-digits"  # exact model beats glob beats "*"
    assert chosen("bob", ("analyst",), "digitz") == "analysts-d-glob"
    assert chosen("bob", ("analyst",), "other") == "analysts-any"
    assert chosen("bob", ("guest",)) == "role-wildcard"  # wildcard role on exact model beats wildcard everything
    assert chosen("bob", ("guest",), "other") == "everyone"
    assert select(rules[1:4], "bob", ("guest",), "other") is None
