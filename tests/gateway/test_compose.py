"""The compose action (CONTRACT §11) against real upstreams: ctx.call with identity headers,
retries by idempotency, compensations newest first, a raising handler's clean 500, handler
import errors at FILE:LINE:COL, and re-import of a changed handler on reload."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import cast

import pytest
from aiohttp.test_utils import TestServer
from pytest_aiohttp import AiohttpClient, AiohttpServer

from gateway.config.build import load, load_text
from gateway.config.model import ComposeAction
from gateway.runtime.state import Gateway
from tests.compose_upstreams import HITS, SEEN, make_parts_app
from tests.gateway import compose_handlers
from tests.gateway.conftest import GatewayClient, GatewayTestServer, compile_gateway
from tests.polling import free_port

KEY = "compose-test-key"
H = "tests.gateway.compose_handlers"
HEAD = f"""
version: 1
auth:
  api_keys:
    - {{consumer: tester, key_sha256: {hashlib.sha256(KEY.encode()).hexdigest()}}}
services:
  a: {{targets: [$PARTS]}}
  b: {{targets: [$PARTS]}}
  dead: {{targets: ["http://127.0.0.1:{free_port()}"]}}
  pair: {{targets: ["http://127.0.0.1:{free_port()}", $PARTS], retries: 1}}
  flaky: {{targets: [$PARTS], retries: 2}}
routes:
"""


def route(handler: str, extra: str = "") -> str:
    return f"  - prefix: /c\n{extra}    compose: {{handler: '{H}:{handler}'}}\n"


MakeCompose = Callable[[str], "asyncio.Future[GatewayClient]"]


@pytest.fixture
async def parts(aiohttp_server: AiohttpServer) -> TestServer:
    return await aiohttp_server(make_parts_app())


@pytest.fixture
def make_compose(aiohttp_client: AiohttpClient, parts: TestServer) -> MakeCompose:
    """A gateway from HEAD + routes, loaded off the loop (as startup and reload do)."""

    async def make(routes: str) -> GatewayClient:
        gateway: Gateway = await asyncio.to_thread(compile_gateway, HEAD + routes, parts=parts)
        client: object = await aiohttp_client(GatewayTestServer(gateway))
        return cast(GatewayClient, client)

    return cast(MakeCompose, make)


async def test_calls_carry_identity_headers_and_the_request_id_and_answer_parsed_json(
    make_compose: MakeCompose, parts: TestServer
) -> None:
    client = await make_compose(route("two_calls", "    auth: {any_of: [api_key]}\n"))

    resp = await client.get("/c", headers={"X-API-Key": KEY, "X-Request-ID": "req-9"})
    body = await resp.json()

    assert resp.status == 200
    assert body["consumer"] == "tester"
    for name in ("one", "two"):
        headers = body[name]["headers"]
        assert headers["X-Request-ID"] == "req-9"
        assert headers["X-Consumer"] == "tester"
        assert "traceparent" in headers
        assert headers["X-Forwarded-For"] == "127.0.0.1"
    assert body["two"]["method"] == "POST"
    assert body["two"]["body"] == '{"n": 2}'
    assert body["two"]["headers"]["Content-Type"] == "application/json"
    assert body["two"]["headers"]["X-Extra"] == "1"
    assert body["steps"] == [
        {"service": "a", "method": "GET", "path": "/json/one", "status": 200, "state": "applied"},
        {"service": "b", "method": "POST", "path": "/json/two", "status": 200, "state": "applied"},
    ]


async def test_a_handler_that_raises_is_a_clean_500_and_its_traceback_is_logged_once(
    make_compose: MakeCompose, parts: TestServer, caplog: pytest.LogCaptureFixture
) -> None:
    client = await make_compose(route("raises"))
    compose_handlers.UNDONE.clear()

    with caplog.at_level(logging.ERROR):
        resp = await client.post("/c")
        text = await resp.text()

    assert resp.status == 500
    assert resp.content_type == "application/problem+json"
    problem = await resp.json()
    assert problem["detail"] == "the compose handler failed"
    assert problem["steps"][0]["state"] == "compensated"  # what was done is undone
    assert "secret-detail" not in text
    assert "Traceback" not in text
    assert "RuntimeError" not in text
    logged = [r for r in caplog.records if r.exc_info is not None]
    assert len(logged) == 1
    assert logged[0].name == "gateway.compose"
    assert compose_handlers.UNDONE == ["first"]


async def test_compensations_run_newest_first_when_a_later_step_fails(
    make_compose: MakeCompose, parts: TestServer
) -> None:
    client = await make_compose(route("saga"))
    compose_handlers.UNDONE.clear()

    resp = await client.post("/c")
    problem = await resp.json()

    assert resp.status == 502
    assert problem["detail"] == "the third step failed"
    assert problem["reason"] == "status 500"
    assert compose_handlers.UNDONE == ["s2", "s1"]
    paths = [seen[1] for seen in parts.app[SEEN]]
    assert paths == ["/json/s1", "/json/s2", "/json/undo-s2", "/json/undo-s1"]
    assert [(s["path"], s["state"]) for s in problem["steps"]] == [
        ("/json/s1", "compensated"),
        ("/json/s2", "compensated"),
        ("/status/500", "failed"),
    ]


async def test_an_unhandled_failed_call_is_a_502_with_the_steps_and_compensations_run(
    make_compose: MakeCompose, parts: TestServer
) -> None:
    client = await make_compose(route("saga_unhandled"))
    compose_handlers.UNDONE.clear()

    resp = await client.post("/c")
    problem = await resp.json()

    assert resp.status == 502
    assert problem["type"].endswith("/call-failed")
    assert "service 'dead'" in problem["detail"]
    assert "127.0.0.1" not in str(problem)
    assert [(s["service"], s["state"]) for s in problem["steps"]] == [
        ("a", "compensated"),
        ("dead", "failed"),
    ]
    assert compose_handlers.UNDONE == ["s1"]


async def test_compensations_of_a_handler_that_succeeds_never_run(
    make_compose: MakeCompose, parts: TestServer
) -> None:
    client = await make_compose(route("succeeds_with_compensation"))
    compose_handlers.UNDONE.clear()

    resp = await client.post("/c")

    assert resp.status == 201
    assert (await resp.json())["steps"][0]["state"] == "applied"
    assert compose_handlers.UNDONE == []


async def test_an_idempotent_call_is_retried_on_another_target_when_one_is_dead(
    make_compose: MakeCompose, parts: TestServer
) -> None:
    client = await make_compose(route("get_retried"))

    statuses = [(await (await client.get("/c")).json())["status"] for _ in range(4)]

    assert statuses == [200, 200, 200, 200]  # round robin meets the dead target, retries


async def test_a_post_is_retried_only_with_an_idempotency_key(
    make_compose: MakeCompose, parts: TestServer
) -> None:
    client = await make_compose(route("post_flaky"))

    plain = await (await client.post("/c")).json()
    keyed = await (await client.post("/c", params={"key": "k-1"})).json()

    assert plain["status"] == 503
    assert parts.app[HITS]["/flaky/plain"] == 1
    assert keyed["status"] == 200
    assert parts.app[HITS]["/flaky/k-1"] == 2
    seen = [s for s in parts.app[SEEN] if s[1] == "/flaky/k-1"]
    assert all(s[2]["Idempotency-Key"] == "k-1" for s in seen)


async def test_the_handler_sees_method_path_after_the_prefix_query_and_json_body(
    make_compose: MakeCompose, parts: TestServer
) -> None:
    client = await make_compose(route("echo_request"))

    resp = await client.put("/c/scenes/night", params={"q": "1"}, json={"a": [1]})

    assert resp.status == 202
    assert await resp.json() == {
        "method": "PUT",
        "path": "/scenes/night",
        "q": "1",
        "body": {"a": [1]},
    }


@pytest.mark.parametrize(
    ("handler", "message"),
    [
        ("nowhere.at_all:run", "cannot import 'nowhere.at_all': no module named 'nowhere'"),
        (f"{H}:missing", f"module '{H}' has no attribute 'missing'"),
        (
            f"{H}:not_async",
            f"{H}:not_async must be an async function (async def not_async(ctx, request))",
        ),
    ],
    ids=["no-module", "no-function", "not-async"],
)
async def test_a_bad_handler_is_reported_at_file_line_col(handler: str, message: str) -> None:
    text = (
        "version: 1\nservices:\n  s: {targets: ['http://127.0.0.1:9']}\nroutes:\n"
        f"  - prefix: /a\n    compose: {{handler: '{handler}'}}\n"
    )
    result = await asyncio.to_thread(load_text, text, "r.yaml", None)

    assert [str(e) for e in result.errors] == [f"r.yaml:6:24: routes.0.compose.handler: {message}"]


def _write(path: Path, text: str, bump: int) -> None:
    path.write_text(text, encoding="utf-8")
    stamp = path.stat().st_mtime_ns + bump * 1_000_000_000  # a new mtime, even on coarse clocks
    os.utime(path, ns=(stamp, stamp))


def test_a_changed_handler_module_next_to_the_config_is_imported_again_on_load(
    tmp_path: Path,
) -> None:
    module = f"handler_{uuid.uuid4().hex}"
    source = tmp_path / f"{module}.py"
    code = "async def answer(ctx, request):\n    return ctx.json(200, {{'version': {}}})\n"
    _write(source, code.format(1), 0)
    config = tmp_path / "routes.yaml"
    config.write_text(
        "version: 1\nservices:\n  s: {targets: ['http://127.0.0.1:9']}\nroutes:\n"
        f"  - {{prefix: /a, compose: {{handler: '{module}:answer'}}}}\n",
        encoding="utf-8",
    )

    def function_of(path: Path) -> object:
        result = load(path)
        assert result.config is not None, [str(e) for e in result.errors]
        return result.config.routes[0].action

    first = function_of(config)
    _write(source, code.format(22), 5)
    second = function_of(config)

    assert isinstance(first, ComposeAction)
    assert isinstance(second, ComposeAction)
    assert first.function is not None
    assert second.function is not None
    assert first.function is not second.function
    assert 22 in second.function.__code__.co_consts
    assert 1 in first.function.__code__.co_consts


async def test_a_call_past_the_deadline_is_504_and_the_compensations_still_run(
    make_compose: MakeCompose, parts: TestServer
) -> None:
    client = await make_compose(route("too_slow", "    timeouts: {total: 300ms}\n"))
    compose_handlers.UNDONE.clear()

    resp = await client.post("/c")
    problem = await resp.json()

    assert resp.status == 504
    assert problem["type"].endswith("/call-timed-out"), problem
    assert [s.get("state") for s in problem["steps"]] == ["compensated", "failed"], problem
    assert compose_handlers.UNDONE == ["s1"]  # not cut short by the deadline that passed
