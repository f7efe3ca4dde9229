"""Issue 14, hardening that holds: hardened tensors only, refused output parameters, repeatable noise."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from gateway.errors import InvalidRequest
from gateway.noise import NoiseKey
from gateway.pipeline import BackendResponse, Decision, Identity, RequestContext, Route, RouteKind
from gateway.request import BufferedRequest
from gateway.stages.harden import Harden
from gateway.stages.outputs_guard import OutputsGuard
from tests.quota_support import outputs_policy as policy

ROW_A = [0.05, 0.6, 0.1, 0.25, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
ROW_B = [0.9, 0.01, 0.02, 0.03, 0.04, 0.0, 0.0, 0.0, 0.0, 0.0]


def ctx_for(subject: str = "alice", inputs: list[list[float]] | None = None,
            outputs: list[dict[str, Any]] | None = None) -> RequestContext:
    ctx = RequestContext(BufferedRequest("POST", "/v2/models/digits/infer"), "rid", 0.0)
    ctx.route = Route(RouteKind.V2_INFER, "infer", "digits", True)
    ctx.model_name = "digits"
    ctx.identity = Identity(subject, ("partner",), {"sub": subject}, "jwt")
    ctx.decision = Decision(True, "r", ("partner",))
    if inputs is not None:
        ctx.validated_inputs = {"input": np.asarray(inputs, dtype=np.float64).reshape(-1)}
        ctx.json = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [len(inputs), 2],
                                "data": inputs}]}
    if outputs is not None:
        ctx.json = {**(ctx.json or {}), "outputs": outputs}
    return ctx


def answer(rows: list[list[float]], extra: list[dict[str, Any]] | None = None) -> BackendResponse:
    doc = {"model_name": "digits", "outputs": [{"name": "scores", "datatype": "FP32", "shape": [len(rows), 10],
                                                "data": [v for r in rows for v in r]}, *(extra or [])]}
    return BackendResponse(200, body=orjson.dumps(doc), json=doc)


def names(response: BackendResponse) -> list[str]:
    return [o["name"] for o in orjson.loads(response.body or b"")["outputs"]]


def scores(response: BackendResponse) -> np.ndarray:
    outs = {o["name"]: o for o in orjson.loads(response.body or b"")["outputs"]}
    idx = np.asarray(outs["top_k_indices"]["data"]).reshape(outs["top_k_indices"]["shape"])
    val = np.asarray(outs["top_k_scores"]["data"]).reshape(outs["top_k_scores"]["shape"])
    out = np.zeros((idx.shape[0], 10))
    np.put_along_axis(out, idx, val, axis=1)
    return out


CLASSIFICATION = {"name": "classification", "datatype": "BYTES", "shape": [1, 3],
                  "data": ["0.600000:1", "0.250000:3", "0.100000:2"]}
EMBEDDING = {"name": "embedding", "datatype": "FP32", "shape": [1, 2], "data": [0.5, 0.25]}


async def test_every_other_output_is_dropped(tmp_path: Path) -> None:
    stage = Harden(policy(tmp_path, "  - {models: [digits], label_only: true}\n"))
    response = await stage(ctx_for(), answer([ROW_A], [CLASSIFICATION, {"name": "n", "datatype": "INT64",
                                                                           "shape": [1], "data": [7]}]))
    assert names(response) == ["top_k_indices"]
    assert b"0.6" not in (response.body or b"")  # no score leaks past label_only through a string output


async def test_a_second_float_output_is_hardened_not_passed(tmp_path: Path) -> None:
    stage = Harden(policy(tmp_path, "  - {models: [digits], label_only: true}\n"))
    response = await stage(ctx_for(), answer([ROW_A], [EMBEDDING]))
    assert names(response) == ["scores_top_k_indices", "embedding_top_k_indices"]


async def test_keep_passes_the_listed_outputs_unchanged(tmp_path: Path) -> None:
    stage = Harden(policy(tmp_path, "  - {models: [digits], top_k: 1, keep: [embedding]}\n"))
    response = await stage(ctx_for(), answer([ROW_A], [EMBEDDING, CLASSIFICATION]))
    body = orjson.loads(response.body or b"")
    assert [o["name"] for o in body["outputs"]] == ["top_k_indices", "top_k_scores", "embedding"]
    assert body["outputs"][2]["data"] == [0.5, 0.25]
    assert [o["name"] for o in response.json["outputs"]] == ["top_k_indices", "top_k_scores", "embedding"]


async def test_classification_parameter_is_refused_for_hardened_callers(tmp_path: Path) -> None:
    p = policy(tmp_path, "  - {roles: [partner], models: [digits], label_only: true}\n"
                         "  - {roles: [owner], models: [digits]}\n")
    guard = OutputsGuard(p, Harden(p))
    asked = [{"name": "scores", "parameters": {"classification": 3}}]
    with pytest.raises(InvalidRequest, match="output parameter 'classification' is not allowed"):
        await guard(ctx_for(outputs=asked))
    await guard(ctx_for(outputs=[{"name": "scores", "parameters": {"binary_data": True}}]))  # how, not what
    owner = ctx_for(outputs=asked)
    owner.identity = Identity("olga", ("owner",), {"sub": "olga"}, "jwt")
    owner.decision = Decision(True, "r", ("owner",))
    await guard(owner)  # an entry without knobs exempts the owner


NOISY = "  - {models: [digits], noise_epsilon: 0.5, top_k: 10}\n"


async def test_duplicate_rows_get_identical_noise(tmp_path: Path) -> None:
    stage = Harden(policy(tmp_path, NOISY), noise_key=NoiseKey(b"k" * 32, True))
    rows = [[1.0, 2.0]] * 64 + [[3.0, 4.0]]
    out = scores(await stage(ctx_for(inputs=rows), answer([ROW_A] * 64 + [ROW_B])))
    assert np.allclose(out[:64], out[0])  # 64 copies of one input: one draw, nothing to average
    assert not np.allclose(out[0], np.asarray(ROW_A), atol=1e-3)  # and it is noisy
    assert not np.allclose(out[64], out[0])


async def test_repeats_replicas_and_restarts_with_one_key_agree(tmp_path: Path) -> None:
    p = policy(tmp_path, NOISY)
    replica_a = Harden(p, noise_key=NoiseKey(b"shared-secret-0123456789", True))
    replica_b = Harden(p, noise_key=NoiseKey(b"shared-secret-0123456789", True))  # another process, or a restart
    first = scores(await replica_a(ctx_for(inputs=[[1.0, 2.0]]), answer([ROW_A])))
    again = scores(await replica_a(ctx_for(inputs=[[1.0, 2.0]]), answer([ROW_A])))
    other = scores(await replica_b(ctx_for(inputs=[[1.0, 2.0]]), answer([ROW_A])))
    assert np.array_equal(first, again) and np.array_equal(first, other)
    bob = scores(await replica_a(ctx_for("bob", inputs=[[1.0, 2.0]]), answer([ROW_A])))
    assert not np.allclose(bob, first)  # another caller: independent noise
    unkeyed = scores(await Harden(p)(ctx_for(inputs=[[1.0, 2.0]]), answer([ROW_A])))
    assert not np.allclose(unkeyed, first)  # without the key: a per-process key


async def test_noise_has_the_configured_scale_across_rows(tmp_path: Path) -> None:
    stage = Harden(policy(tmp_path, "  - {models: [digits], noise_epsilon: 2.0, top_k: 10}\n"), seed=7)
    rows = [[float(i), 1.0] for i in range(400)]
    out = scores(await stage(ctx_for(inputs=rows), answer([ROW_A] * 400)))
    noise = out[:, 1] - 0.6
    assert abs(noise.mean()) < 0.1
    assert 0.35 < np.abs(noise).mean() < 0.65  # Laplace(b = 1/epsilon = 0.5): mean |x| = b


def test_noise_key_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAAS_NOISE_KEY", "x" * 32)
    key = NoiseKey.from_env("MAAS_NOISE_KEY")
    assert key.configured
    a = key.laplace("s", "m", "o", [b"row"], 10, 1.0)
    assert np.array_equal(a, NoiseKey.from_env("MAAS_NOISE_KEY").laplace("s", "m", "o", [b"row"], 10, 1.0))
    assert not NoiseKey.from_env("MAAS_UNSET_KEY_FOR_TEST").configured


async def test_when_on_outputs_entries(tmp_path: Path) -> None:
    stage = Harden(policy(tmp_path, "  - {roles: [partner], models: [digits], top_k: 2}\n"
                                    "  - {roles: ['*'], models: [digits], label_only: true, when: \"monitor.m\"}\n"
                                    "  - {roles: ['*'], models: [digits], top_k: 3, when: \"subject.tier == 'x'\"}\n"
                                    .replace("monitor.m", "request.params.batch > 1")))
    assert names(await stage(ctx_for(inputs=[[1.0, 2.0]]), answer([ROW_A]))) == ["top_k_indices", "top_k_scores"]
    two = await stage(ctx_for(inputs=[[1.0, 2.0], [3.0, 4.0]]), answer([ROW_A, ROW_B]))
    assert names(two) == ["top_k_indices"]  # the entry whose when holds wins over the more specific one


# ---- through the real gateway: the bundled digits model over HTTP

ASSETS = Path(__file__).resolve().parents[1] / "backends" / "torch" / "assets"
E2E_POLICY: dict[str, Any] = {
    "roles": {"partner": []},
    "rules": [{"id": "partners", "roles": ["partner"], "models": ["digits"], "actions": ["infer"], "effect": "allow"}],
    "outputs": [{"id": "noisy", "roles": ["partner"], "models": ["digits"], "top_k": 3, "round_decimals": 4,
                 "noise_epsilon": 2}],
}
DIGITS = {"digits": {"backend": {"type": "torch", "path": str(ASSETS / "digits.safetensors"), "arch": "digits-mlp",
                                 "max_batch_delay_ms": 1}}}


@pytest.mark.slow
async def test_two_gateways_with_one_key_answer_a_repeat_identically(tmp_path: Path, keys: Any,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import aiohttp

    from tests import harness

    monkeypatch.setenv("MAAS_TEST_NOISE_KEY", "0123456789abcdef0123456789abcdef")
    rows = np.random.default_rng(5).uniform(0, 16, (3, 64)).round(1).tolist()
    request = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [4, 64], "data": rows + [rows[0]]}]}
    bodies = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        async with harness.gateway(tmp_path / name, keys, models=DIGITS, policy=E2E_POLICY,
                                   hardening={"noise_key_env": "MAAS_TEST_NOISE_KEY"}) as gw:
            async with aiohttp.ClientSession() as s:
                auth = keys.auth("acme", ["partner"])
                for _ in range(2):
                    r = await s.post(gw.url + "/v2/models/digits/infer", json=request, headers=auth)
                    assert r.status == 200
                    bodies.append(await r.json())
                r = await s.post(gw.url + "/v2/models/digits/infer", headers=auth,
                                 json={**request, "outputs": [{"name": "output", "parameters": {"classification": 3}}]})
                assert r.status == 400 and "classification" in (await r.json())["error"]
                r = await s.post(gw.url + "/v2/models/digits/infer", json=request, headers=keys.auth("bob", ["partner"]))
                other = await r.json()
    assert all(b["outputs"] == bodies[0]["outputs"] for b in bodies)  # repeats, and the second gateway
    scores_out = next(o for o in bodies[0]["outputs"] if o["name"] == "top_k_scores")["data"]
    assert scores_out[0:3] == scores_out[9:12]  # the duplicated row: the same draw
    assert other["outputs"] != bodies[0]["outputs"]  # another caller: other noise
    assert [o["name"] for o in bodies[0]["outputs"]] == ["top_k_indices", "top_k_scores"]


def test_noise_draws_agree_across_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    """The derivation holds no per-process state: another interpreter with the same key draws the same."""
    import subprocess
    import sys

    monkeypatch.setenv("MAAS_TEST_NOISE_KEY3", "process-independent-key-0123456789")
    code = ("from gateway.noise import NoiseKey; k = NoiseKey.from_env('MAAS_TEST_NOISE_KEY3'); "
            "print(k.laplace('acme', 'digits', 'output', [b'row-1', b'row-2', b'row-1'], 10, 0.5).tobytes().hex())")
    root = Path(__file__).resolve().parents[1]
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=root,
                           check=True).stdout.strip()
    here = NoiseKey.from_env("MAAS_TEST_NOISE_KEY3").laplace("acme", "digits", "output",
                                                             [b"row-1", b"row-2", b"row-1"], 10, 0.5)
    assert other == here.tobytes().hex()
    assert np.array_equal(here[0], here[2]) and not np.array_equal(here[0], here[1])
