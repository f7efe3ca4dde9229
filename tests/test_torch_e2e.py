"""The local runner behind the whole gateway: real sockets, real JWTs, real policy, the bundled model."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from backends.torch import artifact, signing
from gateway.errors import ConfigError
from tests import harness
from tests.harness import Keys, start_gateway
from tests.harness import error_fields

ASSETS = Path(__file__).resolve().parents[1] / "backends" / "torch" / "assets"

POLICY: dict[str, Any] = {
    "roles": {"analyst": [], "model-owner": []},
    "rules": [{"id": "use-digits", "roles": ["analyst", "model-owner"], "models": ["digits"],
               "actions": ["infer", "read"], "effect": "allow"}],
    "outputs": [{"id": "analysts-top2", "roles": ["analyst"], "models": ["digits"], "top_k": 2, "round_decimals": 2}],
}


def protect(tmp_path: Path) -> dict[str, Any]:
    """Encrypt and sign the bundled model in tmp_path; returns the torch backend section."""
    key = artifact.new_key()
    (tmp_path / "model.key").write_text(artifact.encode_key(key))
    enc = tmp_path / "digits.safetensors.enc"
    with open(ASSETS / "digits.safetensors", "rb") as src, open(enc, "wb") as dst:
        artifact.encrypt_stream(src, dst, key, chunk_size=4096)
    signer = signing.new_signing_key()
    signing.sign_file(enc, signer)
    (tmp_path / "signer.pub").write_bytes(signing.public_pem(signer.public_key()))
    return {"type": "torch", "path": str(enc), "arch": "digits-mlp", "key_file": str(tmp_path / "model.key"),
            "verify_key_file": str(tmp_path / "signer.pub")}


def digits_rows(count: int) -> tuple[list[list[float]], list[int]]:
    pytest.importorskip("sklearn")
    from backends.torch.train_digits import split

    _, x_test, _, y_test = split()
    return x_test[:count].tolist(), [int(y) for y in y_test[:count]]


def body(rows: list[list[float]]) -> dict[str, Any]:
    return {"inputs": [{"name": "input", "datatype": "FP32", "shape": [len(rows), 64], "data": rows}]}


@pytest.mark.slow
async def test_encrypted_signed_model_served_and_hardened(tmp_path: Path, keys: Keys) -> None:
    backend = {**protect(tmp_path), "max_batch_delay_ms": 5}
    async with harness.gateway(tmp_path, keys, models={"digits": {"backend": backend}}, policy=POLICY) as gw:
        rows, labels = digits_rows(64)
        async with aiohttp.ClientSession() as s:
            r = await s.get(gw.url + "/v2/models/digits", headers=keys.auth())
            assert r.status == 200
            meta = await r.json()
            assert meta["inputs"][0]["shape"] == [-1, 64] and meta["outputs"][0]["shape"] == [-1, 10]
            r = await s.get(gw.url + "/v2/models/digits/ready", headers=keys.auth())
            assert r.status == 200

            # the model owner gets the full probability vectors
            r = await s.post(gw.url + "/v2/models/digits/infer", json=body(rows), headers=keys.auth("owner", ["model-owner"]))
            assert r.status == 200
            (out,) = (await r.json())["outputs"]
            assert out["name"] == "output" and out["shape"] == [64, 10]
            scores = [out["data"][i * 10:(i + 1) * 10] for i in range(64)]
            predicted = [max(range(10), key=row.__getitem__) for row in scores]
            assert sum(p == y for p, y in zip(predicted, labels)) >= 60

            # an analyst gets two labels with rounded scores; 64 of them at once are batched
            async def one(row: list[float]) -> dict[str, Any]:
                resp = await s.post(gw.url + "/v2/models/digits/infer", json=body([row]), headers=keys.auth())
                assert resp.status == 200
                return await resp.json()

            answers = await asyncio.gather(*(one(row) for row in rows))
            for answer, p in zip(answers, predicted):
                outs = {o["name"]: o for o in answer["outputs"]}
                assert set(outs) == {"top_k_indices", "top_k_scores"}
                assert outs["top_k_indices"]["shape"] == [1, 2] and outs["top_k_indices"]["data"][0] == p
                assert all(round(v, 2) == v for v in outs["top_k_scores"]["data"])
            async with s.get(gw.admin_url + "/metrics") as m:
                text = await m.text()
        count = _sample(text, 'maas_runner_batch_size_count{model="digits"}')
        assert count is not None and count < 64 + 1  # fewer batches than requests: they were batched
        assert gw.gateway.backends["digits"].stats()["max_batch_size_seen"] > 1
        assert _sample(text, 'maas_hardened_responses_total{model="digits",rule="analysts-top2"}') == 64


def _sample(exposition: str, name: str) -> float | None:
    for line in exposition.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


async def test_flood_beyond_the_queue_gets_503_with_retry_after(tmp_path: Path, keys: Keys) -> None:
    backend = {"type": "torch", "path": str(ASSETS / "digits.safetensors"), "arch": "digits-mlp",
               "max_batch_size": 1, "max_batch_delay_ms": 0, "max_queue": 2}
    async with harness.gateway(tmp_path, keys, models={"digits": {"backend": backend}}, policy=POLICY) as gw:
        headers = keys.auth("owner", ["model-owner"])
        connector = aiohttp.TCPConnector(limit=200)
        async with aiohttp.ClientSession(connector=connector) as s:
            async def one() -> tuple[int, str | None]:
                async with s.post(gw.url + "/v2/models/digits/infer", json=body([[1.0] * 64]), headers=headers) as r:
                    await r.read()
                    return r.status, r.headers.get("Retry-After")

            results = await asyncio.gather(*(one() for _ in range(200)))
        statuses = {status for status, _ in results}
        assert statuses <= {200, 503}, statuses
        refused = [retry for status, retry in results if status == 503]
        assert refused and all(retry == "1" for retry in refused)
        assert 200 in statuses


async def test_tampered_model_stops_start_up_with_one_line(tmp_path: Path, keys: Keys) -> None:
    backend = protect(tmp_path)
    data = bytearray(Path(backend["path"]).read_bytes())
    data[-1] ^= 1
    Path(backend["path"]).write_bytes(data)
    with pytest.raises(ConfigError, match=r"^model digits: chunk 4 failed authentication \(tampered, reordered or wrong key\)$"):
        await start_gateway(tmp_path, keys, models={"digits": {"backend": backend}}, policy=POLICY)


async def test_degraded_model_answers_503_and_ready_false(tmp_path: Path, keys: Keys) -> None:
    backend = {**protect(tmp_path), "start_degraded": True}
    (tmp_path / "model.key").write_text(artifact.encode_key(artifact.new_key()))  # the wrong key
    async with harness.gateway(tmp_path, keys, models={"digits": {"backend": backend}}, policy=POLICY) as gw:
        async with aiohttp.ClientSession() as s:
            r = await s.post(gw.url + "/v2/models/digits/infer", json=body([[0.0] * 64]), headers=keys.auth())
            assert r.status == 503
            error = error_fields(await r.json())
            assert error["type"] == "unavailable" and "key" not in error["message"]
            r = await s.get(gw.url + "/v2/models/digits/ready", headers=keys.auth())
            assert r.status == 503 and (await r.json())["ready"] is False


async def test_demo_setup_serves_its_curl_request(tmp_path: Path) -> None:
    from backends.torch.demo import SAMPLE_LABEL, prepare_demo, sample_request
    from gateway.config import load_config
    from gateway.server import start

    setup = prepare_demo(port=18080, admin_port=19090, directory=tmp_path / "demo")
    assert "Authorization: Bearer " + setup.token in setup.curl and "/v2/models/digits/infer" in setup.curl
    config = load_config(setup.config_path)
    assert config.quota is not None and config.quota.store == "memory"
    running = await start(config, port=0, admin_port=0)
    try:
        async with aiohttp.ClientSession() as s:
            r = await s.post(f"http://127.0.0.1:{running.port}/v2/models/digits/infer", json=sample_request(),
                             headers={"Authorization": f"Bearer {setup.token}"})
            assert r.status == 200, await r.text()
            outs = {o["name"]: o for o in (await r.json())["outputs"]}
            assert outs["top_k_indices"]["data"][0] == SAMPLE_LABEL
            assert len(outs["top_k_scores"]["data"]) == 3
            assert "RateLimit-Limit" in r.headers
            r = await s.post(f"http://127.0.0.1:{running.port}/v2/models/digits/infer", json=sample_request())
            assert r.status == 401
    finally:
        await running.stop()


def test_demo_refuses_a_tampered_bundled_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from backends.torch import demo

    fake_assets = tmp_path / "assets"
    shutil.copytree(ASSETS, fake_assets)
    data = bytearray((fake_assets / "digits.safetensors").read_bytes())
    data[200] ^= 1
    (fake_assets / "digits.safetensors").write_bytes(data)
    monkeypatch.setattr(demo, "BUNDLED_MODEL", fake_assets / "digits.safetensors")
    with pytest.raises(ConfigError, match="bundled digits model failed its signature check"):
        demo.prepare_demo(directory=tmp_path / "d")
