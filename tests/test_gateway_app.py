"""`GatewayApp`: model endpoints dispatched before Starlette's stack, every other path through it."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from plinth.gateway.app import GatewayApp


async def ok(request: Request) -> Response:
    return JSONResponse({"path": request.url.path, "body": (await request.body()).decode()})


async def broken(request: Request) -> Response:
    raise RuntimeError("a bug")


async def breaks_mid_stream(request: Request) -> Response:
    async def body() -> AsyncIterator[bytes]:
        yield b"data: first\n\n"
        raise RuntimeError("a bug after the first byte")

    return StreamingResponse(body(), media_type="text/event-stream")


async def on_error(request: Request, exc: Exception) -> Response:
    return JSONResponse({"error": {"message": f"internal error: {type(exc).__name__}"}}, 500)


def make_app() -> GatewayApp:
    routes = [
        Route("/v1/ok", ok, methods=["POST"]),
        Route("/v1/broken", broken, methods=["POST"]),
        Route("/v1/stream", breaks_mid_stream, methods=["POST"]),
        Route("/v1/slow", ok, methods=["POST"]),  # not dispatched directly: through Starlette
    ]
    direct = {"/v1/ok": ok, "/v1/broken": broken, "/v1/stream": breaks_mid_stream}
    return GatewayApp(direct, on_error, routes=routes, exception_handlers={Exception: on_error})


def test_direct_and_routed_endpoints_answer_alike() -> None:
    with TestClient(make_app()) as client:
        for path in ("/v1/ok", "/v1/slow"):
            answer = client.post(path, content=b"hello")
            assert answer.status_code == 200
            assert answer.json() == {"path": path, "body": "hello"}


def test_other_methods_and_paths_still_get_starlettes_answers() -> None:
    with TestClient(make_app()) as client:
        assert client.get("/v1/ok").status_code == 405  # a direct path, but not POST
        assert client.post("/v1/missing").status_code == 404


def test_an_escaping_exception_is_answered_by_the_error_handler() -> None:
    with TestClient(make_app(), raise_server_exceptions=False) as client:
        answer = client.post("/v1/broken")
    assert answer.status_code == 500
    assert answer.json() == {"error": {"message": "internal error: RuntimeError"}}


def test_an_exception_after_the_first_byte_is_left_to_the_server() -> None:
    with TestClient(make_app()) as client, pytest.raises(RuntimeError, match="after the first byte"):
        client.post("/v1/stream")
