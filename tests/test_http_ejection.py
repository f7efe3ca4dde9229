"""What takes an upstream out of rotation: only `eject_on`, within `max_ejection_percent`, and never a 503 of ours.

The failure the issue found: six requests whose input made the model server
answer 500 ejected every upstream of the model, and the model then answered
503 to everyone; with a single upstream, the first request after it recovered
still got "no healthy upstream".
"""

from __future__ import annotations

import pytest
from aiohttp import web
from tests.harness import free_port, start_upstream
from tests.http_helpers import make_backend, make_ctx
from tests.upstreams import config_error_line, http_config, running

from gateway.errors import BackendError
from gateway.pipeline import RouteKind

INFER = "/v2/models/digits/infer"


def ctx(poison: bool = False):
    return make_ctx(RouteKind.V2_INFER, INFER, json={"inputs": [], "poison": poison})


def model_server(state: dict[str, int]):
    """500 for a request whose input the model chokes on, ``state["status"]`` otherwise."""
    async def handler(request: web.Request) -> web.Response:
        doc = await request.json()
        if doc.get("poison"):
            return web.json_response({"error": "bad input"}, status=500)
        status = state.get("status", 200)
        return web.json_response({"outputs": []} if status == 200 else {"error": "down"}, status=status)
    return handler


async def test_500s_a_caller_provokes_never_eject() -> None:
    state: dict[str, int] = {}
    a, b = await start_upstream(model_server(state)), await start_upstream(model_server(state))
    async with running([a.url, b.url], a, b, eject_after_failures=2) as (backend, _):
        statuses = [(await backend.handle(ctx(poison=True))).status for _ in range(12)]
        assert statuses == [500] * 12
        assert all(u.in_rotation for u in backend.upstreams)
        assert [(await backend.handle(ctx())).status for _ in range(4)] == [200] * 4
        assert len(a.seen) == len(b.seen) == 8  # still round-robin across both


async def test_eject_on_can_name_500_and_can_leave_out_connect_errors() -> None:
    state: dict[str, int] = {}
    sick, good = await start_upstream(model_server(state)), await start_upstream(model_server(state))
    async with running([sick.url, good.url], sick, good, eject_after_failures=1, eject_on=[500],
                       retries=0) as (backend, _):
        assert (await backend.handle(ctx(poison=True))).status == 500
        assert not backend.upstreams[0].in_rotation

    live = await start_upstream()
    async with running([f"http://127.0.0.1:{free_port()}", live.url], live, eject_after_failures=1,
                       eject_on=["503"], retries=0) as (backend, _):
        for _ in range(3):
            with pytest.raises(BackendError):
                await backend.handle(ctx())
            await backend.handle(ctx())
        assert all(u.in_rotation for u in backend.upstreams)  # refused connections are not on the list


async def test_never_more_than_max_ejection_percent_out() -> None:
    live = await start_upstream()
    dead = [f"http://127.0.0.1:{free_port()}" for _ in range(3)]
    async with running([*dead, live.url], live, eject_after_failures=1, retries=0) as (backend, _):  # 50 %: 2 of 4
        for _ in range(12):
            try:
                await backend.handle(ctx())
            except BackendError:
                pass
        out = [u for u in backend.upstreams if not u.in_rotation]
        assert len(out) == 2
        assert backend.upstreams[3].in_rotation


async def test_one_upstream_is_never_ejected_by_default_and_answers_as_soon_as_it_recovers() -> None:
    state = {"status": 503}
    up = await start_upstream(model_server(state))
    async with running([up.url], up, eject_after_failures=1) as (backend, _):  # 50 % of 1 rounds down to 0
        for _ in range(6):
            assert (await backend.handle(ctx())).status == 503
        assert backend.upstreams[0].in_rotation
        state["status"] = 200
        assert (await backend.handle(ctx())).status == 200  # the very next request


DEAD_UNTIL_REVIVED = {"eject_after_failures": 1, "eject_for_s": 60, "retries": 0, "max_ejection_percent": 100}


async def test_a_dead_single_upstream_that_comes_back_answers_the_next_request() -> None:
    port = free_port()
    async with running([f"http://127.0.0.1:{port}"], **DEAD_UNTIL_REVIVED) as (backend, started):
        for _ in range(3):
            with pytest.raises(BackendError):  # 502 from the refused connection, never a 503 of ours
                await backend.handle(ctx())
        assert not backend.upstreams[0].in_rotation
        started.append(await start_upstream(port=port))
        assert (await backend.handle(ctx())).status == 200
        assert backend.upstreams[0].in_rotation


async def test_panic_routing_ends_as_soon_as_one_upstream_is_back() -> None:
    ports = [free_port(), free_port()]
    async with running([f"http://127.0.0.1:{p}" for p in ports], **DEAD_UNTIL_REVIVED) as (backend, started):
        for _ in range(2):
            with pytest.raises(BackendError):
                await backend.handle(ctx())
        assert not any(u.in_rotation for u in backend.upstreams)
        ups = [await start_upstream(port=p) for p in ports]
        started.extend(ups)
        assert [(await backend.handle(ctx())).status for _ in range(4)] == [200] * 4
        # the first answer readmitted one upstream; from then on the other waits out its ejection as usual
        back = [u.in_rotation for u in backend.upstreams]
        assert back.count(True) == 1
        assert sorted(len(up.seen) for up in ups) == [0, 4]


BASE = "type: http\nprotocol: v2\nupstreams: [http://x]\n"


def test_eject_settings_default_and_parse() -> None:
    config = http_config(BASE)
    assert config.eject_on == ["connect", "timeout", "502", "503", "504"]
    assert config.max_ejection_percent == 50 and config.max_response_bytes == 67108864
    assert config.max_stream_s == 3600 and config.methods is None
    config = http_config(BASE + "eject_on: [connect, 500, '503', Timeout]\nmax_ejection_percent: 100\n")
    assert config.validate() is None


@pytest.mark.parametrize(("extra", "where", "message"), [
    ("eject_on: [404]\n", "eject_on[0]", "5xx status"),
    ("eject_on: [connect, refused]\n", "eject_on[1]", "expected connect, timeout"),
    ("eject_on: [5000]\n", "eject_on[0]", "5xx status"),
    ("max_ejection_percent: 101\n", "max_ejection_percent", "between 0 and 100"),
    ("max_ejection_percent: -1\n", "max_ejection_percent", "between 0 and 100"),
    ("max_response_bytes: 0\n", "max_response_bytes", "at least 1"),
    ("max_stream_s: 0\n", "max_stream_s", "positive"),
    ("methods: [POST]\n", "methods", "only for protocol raw"),
])
def test_eject_and_limit_mistakes_are_one_line_errors(extra: str, where: str, message: str) -> None:
    line = config_error_line(BASE + extra)
    assert where in line and message in line, line


RAW = "type: http\nprotocol: raw\nupstreams: [http://x]\npaths: [/predict]\n"


@pytest.mark.parametrize(("extra", "where", "message"), [
    ("methods: []\n", "methods", "at least one method"),
    ("methods: [post]\n", "methods[0]", "upper-case HTTP method"),
    ("methods: [POST, 'GET /x']\n", "methods[1]", "upper-case HTTP method"),
    ("methods: [POST, TRACE]\n", "methods[1]", "never forwarded"),
    ("methods: [TRACK]\n", "methods[0]", "never forwarded"),
    ("methods: [CONNECT]\n", "methods[0]", "never forwarded"),
])
def test_raw_methods_mistakes_are_one_line_errors(extra: str, where: str, message: str) -> None:
    line = config_error_line(RAW + extra)
    assert where in line and message in line, line


def test_raw_methods_default_to_post() -> None:
    assert make_backend(["http://127.0.0.1:1"], protocol="raw", paths=["/p"]).raw_methods() == ["POST"]
    backend = make_backend(["http://127.0.0.1:1"], protocol="raw", paths=["/p"], methods=["PUT", "POST"])
    assert backend.raw_methods() == ["POST", "PUT"]
