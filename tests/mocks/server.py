"""The lifecycle the mock upstreams share: an aiohttp application on a free loopback port.

A subclass builds its `web.Application` in `make_app()`; this class serves it on 127.0.0.1 (port 0,
so the OS picks a free one) and owns `start()`, `close()`, `async with`, `port` and `url`.

    class EchoUpstream(LoopbackServer):
        def make_app(self) -> web.Application:
            app = web.Application()
            app.router.add_post("/echo", self._echo)
            return app

    async with EchoUpstream() as upstream:  # or: upstream = await EchoUpstream().start()
        ... point a client at upstream.url ...
"""

from __future__ import annotations

from typing import Self

from aiohttp import web

HOST = "127.0.0.1"


class LoopbackServer:
    def __init__(self) -> None:
        self._runner: web.AppRunner | None = None
        self.port = 0  # set by start()

    def make_app(self) -> web.Application:
        """The application to serve: routes, handlers and limits such as `client_max_size`."""
        raise NotImplementedError

    @property
    def url(self) -> str:
        """The server's root; a subclass may add the path its clients take as base URL."""
        return f"http://{HOST}:{self.port}"

    async def start(self) -> Self:
        self._runner = web.AppRunner(self.make_app(), access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, HOST, 0).start()
        self.port = int(self._runner.addresses[0][1])
        return self

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
