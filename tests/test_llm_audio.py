"""Audio uploads (``multipart/form-data``): the model comes from the form field, and that model's
``max_body_bytes`` holds while the upload arrives, before it is read whole."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web

from tests.harness import gateway, openai_model

POLICY = {"roles": {"analyst": []}, "rules": [
    {"id": "open", "roles": ["analyst"], "models": ["whisper", "tiny"], "actions": ["infer"], "effect": "allow"}]}
SERVER_LIMIT = 1_048_576


async def transcribe(request: web.Request) -> web.StreamResponse:
    form = await request.post()
    upload = form["file"]
    size = len(upload.file.read()) if hasattr(upload, "file") else -1
    model = form["model"]
    return web.json_response({"text": f"{model if isinstance(model, str) else '?'}:{size}"})


class AudioServer:
    """An upstream that takes uploads larger than aiohttp's default 1 MiB, and counts what it got."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def __aenter__(self) -> AudioServer:
        async def handler(request: web.Request) -> web.StreamResponse:
            self.seen.append(request.path)
            return await transcribe(request)

        app = web.Application(client_max_size=64 * SERVER_LIMIT)
        app.router.add_route("*", "/{tail:.*}", handler)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = next(a for a in self._runner.addresses if isinstance(a, tuple))[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


def upstream(handler: Any) -> AudioServer:
    return AudioServer()


def models(url: str) -> dict[str, Any]:
    return {"whisper": {**openai_model(url), "max_body_bytes": 4 * SERVER_LIMIT},
            "tiny": {**openai_model(url, model_name="tiny-upstream"), "max_body_bytes": 100_000},
            "secret": openai_model(url)}


@pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")  # openai marks translations deprecated
async def test_transcription_and_translation_with_the_openai_client(tmp_path, keys):
    async with upstream(transcribe) as up, gateway(tmp_path, keys, models=models(up.url), policy=POLICY) as gw:
        client = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=keys.token("alice"), max_retries=0)
        big = b"\x00" * (2 * SERVER_LIMIT)  # over the server's limit, within whisper's own
        result = await client.audio.transcriptions.create(model="whisper", file=("a.wav", big))
        assert result.text == f"whisper:{len(big)}"
        small = await client.audio.translations.create(model="tiny", file=("a.wav", b"RIFF...."))
        assert small.text == "tiny-upstream:8"  # the form's model field renamed for the upstream, file untouched
        with pytest.raises(openai.PermissionDeniedError):
            await client.audio.transcriptions.create(model="secret", file=("a.wav", b"x"))
        with pytest.raises(openai.APIStatusError) as too_big:
            await client.audio.transcriptions.create(model="tiny", file=("a.wav", b"\x00" * 200_000))
        assert too_big.value.status_code == 413
        assert len(up.seen) == 2


async def test_an_upload_over_its_models_limit_is_refused_while_it_arrives(tmp_path, keys):
    async with upstream(transcribe) as up, gateway(tmp_path, keys, models=models(up.url), policy=POLICY) as gw:
        port = int(gw.url.rsplit(":", 1)[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        boundary = "xyz"
        head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\ntiny\r\n"
                f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n"
                "Content-Type: application/octet-stream\r\n\r\n").encode()
        chunk = head + b"\x00" * 150_000  # past tiny's 100 kB; the rest of the body never comes
        writer.write((f"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                      f"{keys.token('alice')}\r\nContent-Type: multipart/form-data; boundary={boundary}\r\n"
                      "Transfer-Encoding: chunked\r\n\r\n").encode() + f"{len(chunk):x}\r\n".encode() + chunk
                     + b"\r\n")
        await writer.drain()
        status = await asyncio.wait_for(reader.readline(), 5)  # answered without waiting for the body's end
        writer.close()
        assert status.split()[1] == b"413", status
        assert up.seen == []


@pytest.mark.parametrize(("content_type", "body", "status"), [
    ("application/json", b'{"model": "tiny"}', 415),
    ("multipart/form-data", b"--x\r\n", 400),  # no boundary
    ("multipart/form-data; boundary=x", b"garbage", 400),
    ("multipart/form-data; boundary=x", b'--x\r\nContent-Disposition: form-data; name="model"\r\n\r\ntiny\r\n--x--',
     400),  # no file part
    ("multipart/form-data; boundary=x", b'--x\r\nContent-Disposition: form-data; name="model"\r\n\r\ntiny', 400),
    ("multipart/form-data; boundary=x", b'--x\r\nContent-Disposition: form-data; name="file"; filename="a"\r\n\r\n'
                                        b'abc\r\n--x--', 400),  # no model field
    ("multipart/form-data; boundary=x", b'--x\r\nContent-Disposition: form-data; name="model"\r\n\r\nnope\r\n'
                                        b'--x\r\nContent-Disposition: form-data; name="file"; filename="a"\r\n\r\n'
                                        b'abc\r\n--x--', 404),  # unknown model
])
async def test_malformed_uploads_are_4xx_and_never_forwarded(tmp_path, keys, content_type, body, status):
    async with upstream(transcribe) as up, gateway(tmp_path, keys, models=models(up.url), policy=POLICY) as gw:
        async with aiohttp.ClientSession() as s:
            async with s.post(gw.url + "/v1/audio/transcriptions", data=body,
                              headers={**keys.auth("alice"), "Content-Type": content_type}) as r:
                assert r.status == status, await r.text()
                assert "error" in await r.json()
        assert up.seen == []


async def test_request_params_of_an_upload_reach_the_policy(tmp_path, keys):
    """``request.params`` of an audio form: a deny on ``temperature`` holds, and a form without one (unknown) is
    denied too — a deny rule whose condition is unknown applies."""
    policy = {**POLICY, "rules": [*POLICY["rules"], {
        "id": "no-hot-audio", "roles": ["*"], "models": ["*"], "actions": ["infer"], "effect": "deny",
        "when": "not (request.params.temperature <= 0.5)"}]}
    async with upstream(transcribe) as up, gateway(tmp_path, keys, models=models(up.url), policy=policy) as gw:
        client = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=keys.token("alice"), max_retries=0)
        cool = await client.audio.transcriptions.create(model="whisper", file=("a.wav", b"RIFF"), temperature=0.2)
        assert cool.text == "whisper:4"
        with pytest.raises(openai.PermissionDeniedError):
            await client.audio.transcriptions.create(model="whisper", file=("a.wav", b"RIFF"), temperature=0.9)
        with pytest.raises(openai.PermissionDeniedError):
            await client.audio.transcriptions.create(model="whisper", file=("a.wav", b"RIFF"))
        assert len(up.seen) == 1
