"""An https URL (typically a pre-signed S3 GET) as a source: ranged GETs pinned to the first ETag.

A pre-signed URL allows only GET, so the size and ETag come from a first ``Range: bytes=0-0``
request (its Content-Range names the total). Every later read sends ``If-Match`` with that ETag;
a 412 means the object was replaced mid-read. Retries and resumption are those of :mod:`.retry`.
Names in messages drop the query string: it holds the URL's signature.
"""

from __future__ import annotations

import os
import re
import ssl
from urllib.parse import urlsplit, urlunsplit

import aiohttp

from ..errors import StorageError, UsageError
from .base import DEFAULT_READAHEAD, DEFAULT_WINDOW
from .retry import RangedSource, Received, Retrier, RetryPolicy, Transient, network_failure, status_failure

#: ``Content-Range: bytes 0-0/1234`` (or ``bytes */1234`` when the object is empty).
CONTENT_RANGE = re.compile(r"bytes (?:(\d+)-(\d+)|\*)/(\d+)$")


def public_name(url: str) -> str:
    """The URL without its query string and credentials (pre-signed URLs carry a signature there)."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))


def ca_bundle_path(ca_bundle: str | None) -> str | None:
    """The CA bundle to trust (the parameter, else AWS_CA_BUNDLE), refused at once if it is missing."""
    path = ca_bundle or os.environ.get("AWS_CA_BUNDLE") or None
    if path is not None and not os.path.isfile(path):
        raise StorageError(f"CA bundle {path} is not a readable file", reason="tls.ca_bundle")
    return path


def ssl_context(ca_bundle: str | None) -> ssl.SSLContext:
    path = ca_bundle_path(ca_bundle)
    try:
        return ssl.create_default_context(cafile=path)
    except (OSError, ssl.SSLError) as exc:
        raise StorageError(f"CA bundle {path} cannot be loaded: {exc}", reason="tls.ca_bundle") from None


def http_failure(status: int, name: str, reason: str) -> Exception:
    """A :class:`Transient` for a retryable status, else a :class:`StorageError` saying what failed."""
    text = f"HTTP {status} {reason}"
    if status == 412:
        return StorageError(f"{name}: object changed while reading ({text})", reason="http.changed")
    if status in (401, 403):
        return StorageError(f"access denied reading {name} ({text}; has the URL expired?)",
                            reason="http.denied")
    if status == 404:
        return StorageError(f"{name}: not found ({text})", reason="http.not_found")
    return status_failure(status, text) or StorageError(f"reading {name} failed ({text})",
                                                        reason="http.error")


class HttpSource(RangedSource):
    def __init__(self, url: str, session: aiohttp.ClientSession, size: int, etag: str | None,
                 policy: RetryPolicy, window: int = DEFAULT_WINDOW, readahead: int = DEFAULT_READAHEAD) -> None:
        super().__init__(public_name(url), size, policy, window, readahead)
        self.url = url
        self.etag = etag
        self._session = session

    @classmethod
    async def open(cls, url: str, policy: RetryPolicy | None = None, ca_bundle: str | None = None,
                   connections: int = 16, window: int = DEFAULT_WINDOW,
                   readahead: int = DEFAULT_READAHEAD) -> HttpSource:
        if not url.startswith(("https://", "http://")):
            raise UsageError(f"{public_name(url)} is not an http(s) URL")
        policy = policy or RetryPolicy()
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=connections, ssl=ssl_context(ca_bundle)),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=policy.connect_timeout,
                                          sock_read=policy.read_timeout),
            auto_decompress=False,  # byte ranges are of the stored bytes
        )
        try:
            size, etag = await Retrier(policy).run(lambda: _probe(session, url),
                                                   f"opening {public_name(url)}")
        except BaseException:
            await session.close()
            raise
        return cls(url, session, size, etag, policy, window, readahead)

    async def _fetch(self, offset: int, length: int, into: Received) -> None:
        headers = {"Range": f"bytes={offset}-{offset + length - 1}"}
        if self.etag:
            headers["If-Match"] = self.etag
        try:
            async with self._session.get(self.url, headers=headers) as response:
                if response.status != 206:
                    raise http_failure(response.status, self.name, response.reason or "")
                if response.content_length != length:
                    raise StorageError(f"{self.name}: asked for {length} bytes at {offset}, the server sent "
                                       f"{response.content_length}", reason="http.range")
                start = into.size
                while into.size - start < length and (chunk := await response.content.readany()):
                    into.add(chunk)  # each received chunk whole (read(n) would join them)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise network_failure(exc) or StorageError(f"reading {self.name}: {exc}",
                                                       reason="http.error") from None

    async def close(self) -> None:
        await self._session.close()


async def _probe(session: aiohttp.ClientSession, url: str) -> tuple[int, str | None]:
    """Size and ETag of the object behind ``url``, from a one-byte ranged GET."""
    name = public_name(url)
    try:
        async with session.get(url, headers={"Range": "bytes=0-0"}) as response:
            if response.status not in (206, 416):
                if response.status == 200:
                    raise StorageError(f"{name}: the server does not support ranged reads",
                                       reason="http.no_ranges")
                raise http_failure(response.status, name, response.reason or "")
            match = CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
            if not match:
                raise StorageError(f"{name}: no usable Content-Range in the response", reason="http.range")
            await response.read()  # at most one byte: lets the connection be reused
            return int(match.group(3)), response.headers.get("ETag")
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        transient: Transient | None = network_failure(exc)
        if transient is None:
            raise StorageError(f"opening {name}: {exc}", reason="http.tls" if isinstance(
                exc, aiohttp.ClientSSLError) else "http.error") from None
        raise transient from None
