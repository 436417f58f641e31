"""A fault-injecting HTTP proxy on 127.0.0.1, in front of an S3 server, for the retry tests.

Requests are forwarded unchanged (the Host header too, so signatures still verify). A fault plan
says, per HTTP method, which request goes wrong and how: an error status (500, 503, SlowDown), a
connection reset in the middle of the body, a body cut short with a clean close, a stall longer
than the client's read timeout, or an uploaded body with one byte flipped. Faults fire exactly
once each, in a deterministic order, and every one that fired is recorded in
:attr:`FaultProxy.fired`. A proxy may also stand for a server that copies nothing: every request
naming a copy source (CopyObject, UploadPartCopy) is answered 501 NotImplemented; or only those
that build a scratch object of zeros from another (vmied's larger rungs); or for a server that
ignores ``x-amz-copy-source-range``: the header is dropped, and the whole source is copied.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import aiohttp
from aiohttp import web

HOP_BY_HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "content-length", "te", "upgrade",
                        "proxy-connection"})
STATUS_FAULTS = {
    "500": (500, "InternalError", "We encountered an internal error. Please try again."),
    "503": (503, "ServiceUnavailable", "Please reduce your request rate."),
    "slowdown": (503, "SlowDown", "Please reduce your request rate."),
    "nocopy": (501, "NotImplemented", "A header you provided implies functionality that is not implemented."),
}
BODY_FAULTS = ("reset", "truncate", "stall")


@dataclass
class Fault:
    """Apply ``kind`` to the ``nth`` (1-based) request with ``method`` counted from the plan's start."""

    kind: str  # one of STATUS_FAULTS, BODY_FAULTS, "drop" (close without answering), "corrupt" (request body)
    method: str
    nth: int


class FaultProxy:
    def __init__(self, upstream: str, plan: list[Fault], stall: float = 5.0, copies: str = "served") -> None:
        self.upstream = upstream.rstrip("/")
        self.plan = list(plan)
        self.stall = stall
        self.copies = copies  # "served", "refused" (501), "rungs-refused" (501), or "whole" (no range)
        self.copies_altered = 0  # copy requests refused or stripped of their range
        self.fired: list[str] = []
        self.counts: dict[str, int] = {}
        self.endpoint = ""
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._stopping: asyncio.Event | None = None

    def _take(self, method: str) -> str | None:
        count = self.counts[method] = self.counts.get(method, 0) + 1
        for fault in self.plan:
            if fault.method == method and fault.nth == count:
                self.fired.append(f"{method}#{count}:{fault.kind}")
                return fault.kind
        return None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        kind = self._take(request.method)
        dropped = set()
        into_rung = ".vmied-zeros-" in request.path and not request.path.endswith("-check")
        if "x-amz-copy-source" in request.headers and (
                self.copies == "refused" or (self.copies == "rungs-refused" and into_rung)):
            self.copies_altered += 1
            kind = "nocopy"
        elif self.copies == "whole" and "x-amz-copy-source-range" in request.headers:
            self.copies_altered += 1
            dropped.add("x-amz-copy-source-range")
        if kind in STATUS_FAULTS:
            status, code, message = STATUS_FAULTS[kind]
            xml = f"<?xml version='1.0'?><Error><Code>{code}</Code><Message>{message}</Message></Error>"
            return web.Response(status=status, text=xml, content_type="application/xml")
        if kind == "drop":
            _reset(request)
            return web.Response()  # never sent: the connection is gone
        if kind == "corrupt" and body:  # one byte flipped on the way: the part's checksum must catch it
            body = body[:-1] + bytes([body[-1] ^ 0xFF])
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP | dropped}
        assert self._session is not None
        async with self._session.request(request.method, self.upstream + request.path_qs, headers=headers,
                                         data=body if body else None, allow_redirects=False) as upstream:
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            for key, value in upstream.headers.items():
                if key.lower() not in HOP_BY_HOP or key.lower() == "content-length":
                    response.headers.add(key, value)
            await response.prepare(request)
            payload = await upstream.read()
            if kind in BODY_FAULTS and len(payload) > 1:
                await response.write(payload[: len(payload) // 2])
                if kind == "stall":
                    await asyncio.sleep(self.stall)
                if kind == "reset":
                    _reset(request)
                elif request.transport is not None:
                    request.transport.close()
                return response
            if payload:
                await response.write(payload)
            await response.write_eof()
            return response

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._run())

    async def _run(self) -> None:
        self._stopping = asyncio.Event()
        self._session: aiohttp.ClientSession | None = aiohttp.ClientSession(auto_decompress=False)
        app = web.Application(client_max_size=1 << 31)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.endpoint = f"http://127.0.0.1:{port}"
        self._ready.set()
        await self._stopping.wait()
        await runner.cleanup()
        await self._session.close()

    def start(self) -> FaultProxy:
        self._thread.start()
        self._ready.wait(10)
        return self

    def stop(self) -> None:
        if self._stopping is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)
        self._thread.join(10)
        self._loop.close()


def _reset(request: web.Request) -> None:
    """Close the client's connection with a TCP reset (SO_LINGER 0), not a clean FIN."""
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


@contextmanager
def fault_proxy(upstream: str, plan: list[Fault], stall: float = 5.0,
                copies: str = "served") -> Iterator[FaultProxy]:
    proxy = FaultProxy(upstream, plan, stall, copies).start()
    try:
        yield proxy
    finally:
        proxy.stop()
