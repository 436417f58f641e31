"""S3 objects as sources (ranged GETs pinned to one ETag) and sinks (multipart uploads), no temp files.

Source: a HeadObject gives the size and ETag; every read is a ranged GET with ``If-Match`` on that
ETag, so an object replaced while it is read fails with "object changed while reading" instead of
mixing two versions. Failed reads resume from the last byte received (:mod:`.retry`).

Sink: the output is cut into parts in order and up to ``parts_in_flight`` parts upload at once,
each with its Content-MD5. A part that overlaps a placeholder (a region the writer fills at the
end) stays in memory until it is filled; parts may be uploaded in any order, and every part but
the last has its planned size (>= 5 MiB, as S3 requires), or is a run of zeros copied inside the
server from a scratch object (:mod:`.s3_zeros`; at least its planned size, and it takes one slot but
no memory). Parts in flight are counted in base parts (a part of twice the base takes two
slots), so memory stays about ``base part size x (parts in flight + 1)`` plus the parts holding
placeholders, until the output is so large that one part alone must outgrow that (see the table),
whatever the disk size.
An output smaller than one part is a single PUT. On failure or cancellation the upload is aborted
(no orphan parts, no object); on success the object's size is checked with HeadObject.

Part sizes (S3: at most 10,000 parts of 5 MiB to 5 GiB)::

    part index   0 ........ 4,999 | 5,000 .. 5,499 | 5,500 .. 5,999 | ... | 9,999
    part size    base (flat)      | 2 x base       | 4 x base       | ... | capped at 5 GiB

With the default 8 MiB base the flat region holds 39 GiB and the whole plan about 8 TiB, more than
the 5 TiB object limit, so the writer need not know the output size. An ``expected_size`` hint
raises the base only when the whole plan could not hold it (a small configured base): a large
source alone must not make every part, and so the memory, larger.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import posixpath
from collections.abc import Awaitable, Callable, Mapping
from contextlib import AsyncExitStack
from functools import partial
from typing import Any, TypeVar

from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    HTTPClientError,
    IncompleteReadError,
    ResponseStreamingError,
    SSLError,
)

from .. import metrics
from ..errors import StorageError
from ..extents import Buffer
from ..pipeline import cancel_and_wait
from .base import MiB, Placeholder, Sink, Source, check_sibling_name
from .retry import RangedSource, Received, Retrier, Transient, network_failure, status_failure
from .s3_config import MIN_PART, S3Config, S3Location
from .s3_zeros import ZeroCopy, ZeroLadder, copy_zeros, rung_sizes

T = TypeVar("T")

GiB = 1 << 30
MAX_PART = 5 * GiB
MAX_PARTS = 10_000
#: Parts at the base size before sizes start doubling (see the module's table).
FLAT_PARTS = 5_000
GROWTH_STEP = 500
#: Error codes S3 uses for "slow down / try again" besides the 5xx statuses, and for a body damaged
#: or cut on the way (BadDigest: the part's Content-MD5 caught it; the bytes in memory are fine).
TRANSIENT_CODES = frozenset({"SlowDown", "RequestTimeout", "Throttling", "ThrottlingException",
                             "RequestTimeTooSkewed", "InternalError", "ServiceUnavailable", "BadDigest",
                             "IncompleteBody"})


def base_part_size(configured: int, expected_size: int | None) -> int:
    """The flat part size: the configured one, raised (in MiB) only if the plan cannot hold ``expected_size``."""
    base = min(max(configured, MIN_PART), MAX_PART)
    while expected_size and plan_capacity(base) < expected_size and base < MAX_PART:
        base = min(MAX_PART, max(base + MiB, -(-base * 5 // 4 // MiB) * MiB))
    return base


def plan_capacity(base: int) -> int:
    """Bytes the whole 10,000-part plan holds with this base."""
    return sum(part_size(index, base) for index in range(MAX_PARTS))


def part_size(index: int, base: int) -> int:
    """Size of part ``index`` (0-based) in the plan of the module's table."""
    if index >= MAX_PARTS:
        raise StorageError(f"the output needs more than {MAX_PARTS} parts; give a larger size hint",
                           reason="s3.too_large")
    if index < FLAT_PARTS:
        return base
    return min(MAX_PART, base << ((index - FLAT_PARTS) // GROWTH_STEP + 1))


def md5_of_etag(etag: str) -> str | None:
    """The hex MD5 an ETag holds (lower case), or None for an ETag of another kind."""
    plain = etag.strip('"').lower()
    return plain if len(plain) == 32 and all(c in "0123456789abcdef" for c in plain) else None


def multipart_etag(part_etags: list[str]) -> str | None:
    """The ETag S3 gives a completed multipart object: the MD5 of the parts' binary MD5s, "-" and their
    count; None where a part's ETag is no MD5 (some encryption modes), so no checksum can be derived."""
    combined = hashlib.md5(usedforsecurity=False)
    for etag in part_etags:
        digest = md5_of_etag(etag)
        if digest is None:
            return None
        combined.update(bytes.fromhex(digest))
    return f'"{combined.hexdigest()}-{len(part_etags)}"'


def content_md5(data: Buffer) -> str:
    return base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode()


def s3_failure(exc: BaseException, location: S3Location, action: str) -> Exception:
    """A :class:`Transient` to retry or a :class:`StorageError` naming the bucket, key and action."""
    import aiohttp  # loaded with the client (aiobotocore); kept off the local-only start path

    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
        text = f"{code or status}: {error.get('Message') or 'no message'}"
        if status == 412 or code == "PreconditionFailed":
            return StorageError(f"{location}: object changed while reading ({action} refused: {text})",
                                reason="s3.changed")
        if status == 403 or code in ("AccessDenied", "Forbidden", "InvalidAccessKeyId",
                                     "SignatureDoesNotMatch"):
            return StorageError(f"access denied: {action} on bucket {location.bucket!r} key "
                                f"{location.key!r} ({text})", reason="s3.denied")
        if status == 404 or code in ("NoSuchKey", "NoSuchBucket", "NotFound"):
            what = {"NoSuchBucket": "bucket", "NoSuchKey": "object"}.get(code, "bucket or object")
            return StorageError(f"{action}: no such {what}: bucket {location.bucket!r} key "
                                f"{location.key!r} ({text})", reason="s3.not_found")
        if code in TRANSIENT_CODES:
            return Transient(code, text)
        transient = status_failure(status, text)
        if transient:
            return transient
        return StorageError(f"{action} on {location} failed ({text})", reason="s3.error")
    if isinstance(exc, SSLError | aiohttp.ClientSSLError):
        return StorageError(f"{action} on {location}: TLS failed ({exc}); is the CA bundle right?",
                            reason="s3.tls")
    if isinstance(exc, IncompleteReadError | ResponseStreamingError):
        return Transient("truncated", str(exc))
    if isinstance(exc, HTTPClientError):  # connection closed or refused, read/connect timeouts
        return Transient("connection", str(exc))
    transient = network_failure(exc)
    if transient:
        return transient
    if isinstance(exc, BotoCoreError):  # credentials, profiles, endpoint configuration
        return StorageError(f"{action} on {location}: {exc}", reason="s3.config")
    return StorageError(f"{action} on {location} failed: {exc}", reason="s3.error")


async def s3_call(location: S3Location, action: str, call: Callable[[], Awaitable[T]]) -> T:
    """One attempt at an S3 request, its failures sorted into retryable or not (and counted)."""
    import aiohttp

    requests = metrics.S3_REQUESTS
    operation = operation_label(action)
    try:
        result = await call()
    except (ClientError, BotoCoreError, aiohttp.ClientError, OSError, TimeoutError) as exc:
        failure = s3_failure(exc, location, action)
        requests.labels(operation, "transient" if isinstance(failure, Transient) else "failed").inc()
        raise failure from None
    requests.labels(operation, "ok").inc()
    return result


def operation_label(action: str) -> str:
    """The S3 API operation of an action text: ``"s3:PutObject (UploadPart)"`` -> ``UploadPart``."""
    inner = action.partition("(")[2].partition(")")[0]
    return inner or action.removeprefix("s3:")


async def s3_client(config: S3Config, stack: AsyncExitStack) -> Any:
    """An S3 client for ``config`` (the standard credential chain), closed with ``stack``."""
    # aiobotocore (and aiohttp under it) take a quarter of a second to import: only when S3 is used.
    from aiobotocore.config import AioConfig
    from aiobotocore.session import AioSession

    from .http import ca_bundle_path

    try:
        session = AioSession(profile=config.profile)
        botocore_config = AioConfig(
            connect_timeout=config.retry.connect_timeout,
            read_timeout=config.retry.read_timeout,
            max_pool_connections=config.connections,
            retries={"total_max_attempts": 1},  # vmied's Retrier retries, and records why
            # Parts carry a Content-MD5, which the signature covers: over http too, a SHA-256 of every
            # body would be a second hash of every byte (botocore already leaves it out over https).
            s3={"addressing_style": "path" if config.path_style else "auto", "payload_signing_enabled": False},
            request_checksum_calculation="when_required",  # parts carry their own Content-MD5
            response_checksum_validation="when_required",
        )
        return await stack.enter_async_context(session.create_client(
            "s3", region_name=config.region, endpoint_url=config.endpoint_url,
            verify=ca_bundle_path(config.ca_bundle), config=botocore_config,
        ))
    except BotoCoreError as exc:
        raise StorageError(f"cannot set up S3 access: {exc}", reason="s3.config") from None


class S3Source(RangedSource):
    def __init__(self, location: S3Location, config: S3Config, client: Any, stack: AsyncExitStack,
                 size: int, etag: str) -> None:
        super().__init__(str(location), size, config.retry, config.window, config.readahead)
        self.location = location
        self.config = config
        self.etag = etag
        self._client = client
        self._stack = stack

    @classmethod
    async def open(cls, location: S3Location, config: S3Config) -> S3Source:
        stack = AsyncExitStack()
        try:
            client = await s3_client(config, stack)
            head = await Retrier(config.retry).run(
                lambda: s3_call(location, "s3:GetObject (HeadObject)",
                                lambda: client.head_object(Bucket=location.bucket, Key=location.key)),
                f"HeadObject {location}",
            )
        except BaseException:
            await stack.aclose()
            raise
        return cls(location, config, client, stack, int(head["ContentLength"]), str(head["ETag"]))

    async def _fetch(self, offset: int, length: int, into: Received) -> None:
        async def get() -> None:
            response = await self._client.get_object(
                Bucket=self.location.bucket, Key=self.location.key,
                Range=f"bytes={offset}-{offset + length - 1}", IfMatch=self.etag,
            )
            async with response["Body"] as body:
                if int(response["ContentLength"]) != length:
                    raise StorageError(f"{self.location}: asked for {length} bytes at {offset}, the server "
                                       f"sent {response['ContentLength']}", reason="s3.range")
                # aiohttp's reader hands over each received chunk whole (read(n) would join them)
                stream = body.raw_stream.content
                while into.size - start < length and (chunk := await stream.readany()):
                    into.add(chunk)

        start = into.size
        await s3_call(self.location, "s3:GetObject", get)

    async def open_sibling(self, name: str) -> Source:
        key = posixpath.join(posixpath.dirname(self.location.key), check_sibling_name(name))
        return await S3Source.open(S3Location(self.location.bucket, key), self.config)

    async def close(self) -> None:
        await self._stack.aclose()


class S3Sink(Sink):
    """A multipart upload (or one PUT for a small output) of one object; see the module's notes."""

    def __init__(self, location: S3Location, config: S3Config, client: Any, stack: AsyncExitStack,
                 expected_size: int | None) -> None:
        super().__init__(buffer_size=MiB)  # parts are assembled here, so the base buffer stays small
        self.name = str(location)
        self.location = location
        self.retrier = Retrier(config.retry)
        self.part_base = base_part_size(config.part_size, expected_size)
        self._client = client
        self._stack = stack
        self._part = bytearray()  # the part being assembled
        self._part_index = 0
        self._part_offset = 0
        self._held: dict[int, tuple[int, bytearray]] = {}  # index -> (offset, bytes): parts awaiting a fill
        self._unfilled: list[Placeholder] = []
        self._slots_total = max(1, config.parts_in_flight)
        self._slots = asyncio.Semaphore(self._slots_total)
        self._tasks: set[asyncio.Task[None]] = set()
        self._etags: dict[int, str] = {}  # part number -> ETag
        self._upload_id: str | None = None
        self._object_written = False  # a PUT or a completion may have made the object visible
        self._object_etag: str | None = None  # what HeadObject must show once the object is complete
        #: resumable mode: parts an earlier attempt uploaded (number -> (ETag, size)), checked by ListParts
        self._done_before: dict[int, tuple[str, int]] = {}
        #: called with the upload id once the multipart upload exists (awaited before any part is sent)
        self.on_upload: Callable[[str], Awaitable[None]] | None = None
        #: called with (part number, ETag, size) after each part is uploaded
        self.on_part: Callable[[int, str, int], None] | None = None
        self.parts_skipped = 0
        self.zero_parts = 0  # parts sent from the shared zero buffer
        self.copied_parts = 0  # parts of zeros copied inside the server (see :mod:`.s3_zeros`)
        self._zero: tuple[bytes, str] = (b"", "")  # the shared zero part and its Content-MD5
        self._zero_copy_max = min(config.zero_copy_max, MAX_PART)
        self._ladder: ZeroLadder | None = None  # made on the first run of zeros a part long

    @classmethod
    async def create(cls, location: S3Location, config: S3Config, expected_size: int | None = None) -> S3Sink:
        stack = AsyncExitStack()
        client = await s3_client(config, stack)
        return cls(location, config, client, stack, expected_size)

    @property
    def retries(self) -> list[Any]:
        return self.retrier.records

    @property
    def upload_id(self) -> str | None:
        return self._upload_id

    async def resume(self, upload_id: str, parts: Mapping[int, tuple[str, int]], part_base: int) -> bool:
        """Continue an interrupted multipart upload instead of starting a new one (resumable mode).

        The writer must produce the same bytes as the interrupted attempt: a part listed in ``parts``
        whose size and ETag ListParts confirms, and whose recomputed MD5 matches that ETag, is not
        sent again; any other part is (re)uploaded. ``part_base`` must be the interrupted attempt's
        :attr:`part_base`. Returns False (and starts afresh) when the upload no longer exists.
        """
        listed: dict[int, tuple[str, int]] = {}
        marker = 0

        def list_parts(after: int) -> Callable[[], Awaitable[Any]]:
            return lambda: self._client.list_parts(Bucket=self.location.bucket, Key=self.location.key,
                                                   UploadId=upload_id, PartNumberMarker=after)

        try:
            while True:
                page = await self._request("s3:ListMultipartUploadParts", "ListParts", list_parts(marker))
                for part in page.get("Parts", []):
                    listed[int(part["PartNumber"])] = (str(part["ETag"]), int(part["Size"]))
                if not page.get("IsTruncated"):
                    break
                marker = int(page["NextPartNumberMarker"])
        except StorageError as exc:
            if exc.reason == "s3.not_found":  # aborted or expired meanwhile: start over
                return False
            raise
        self._upload_id = upload_id
        self.part_base = part_base
        self._done_before = {number: listed[number] for number, (etag, size) in parts.items()
                             if listed.get(number) == (etag, size)}
        return True

    async def _request(self, action: str, what: str, call: Callable[[], Awaitable[T]]) -> T:
        return await self._request_at(self.location, action, what, call)

    async def _request_at(self, location: S3Location, action: str, what: str,
                          call: Callable[[], Awaitable[T]]) -> T:
        return await self.retrier.run(lambda: s3_call(location, action, call), f"{what} {location}")

    # -- placeholders: the parts that hold them wait in memory until they are filled

    async def reserve(self, length: int) -> Placeholder:
        self._unfilled.append(Placeholder(self.position, length))  # before the zeros may cut a part
        return await super().reserve(length)

    async def fill(self, placeholder: Placeholder, data: Buffer) -> None:
        await super().fill(placeholder, data)
        self._unfilled.remove(placeholder)
        for index, (offset, part) in sorted(self._held.items()):
            if not self._awaits_fill(offset, len(part)):
                del self._held[index]
                await self._upload(index, part)

    def _awaits_fill(self, offset: int, length: int) -> bool:
        return any(p.offset < offset + length and offset < p.offset + p.length for p in self._unfilled)

    async def _fill(self, offset: int, data: bytes) -> None:
        pieces = [(self._part_offset, self._part), *self._held.values()]
        covered = 0
        for start, buffer in pieces:
            lo, hi = max(offset, start), min(offset + len(data), start + len(buffer))
            if lo < hi:
                buffer[lo - start : hi - start] = data[lo - offset : hi - offset]
                covered += hi - lo
        if covered != len(data):
            raise AssertionError(f"placeholder at {offset} was uploaded before it was filled")

    # -- parts

    async def skip(self, length: int) -> None:
        """Zeros. An object has no holes, but zeros need not be uploaded: runs of them are copied inside
        the server from scratch objects of zeros (:mod:`.s3_zeros`), or else a whole part of them is
        sent from one shared zero buffer whose Content-MD5 is computed once."""
        await self.flush()
        while length > 0:
            size = part_size(self._part_index, self.part_base)
            if self._part or length < size:  # (placeholders lie behind: never in a part still to come)
                step = min(length, size - len(self._part))  # up to the next part boundary
                await self.write_zeros(step)
                await self.flush()
            elif copy := await self._zero_copy(length, size):
                step = copy.size
                number = self._next_part(step) + 1
                self.copied_parts += 1
                await self._launch(1, partial(self._copy_part, number, copy))
            else:
                step = size
                index = self._next_part(size)
                self.zero_parts += 1
                await self._upload(index, self._zero_part(size))
            length -= step

    def _next_part(self, size: int) -> int:
        """Take the next part's index for ``size`` bytes of zeros not assembled here."""
        index = self._part_index
        self._part_index += 1
        self._part_offset += size
        self.position += size
        self.bytes_written += size
        return index

    async def _zero_copy(self, length: int, part_size: int) -> ZeroCopy | None:
        """The next part of a run of ``length`` zeros as a copy of a scratch object of zeros; never
        shorter than the planned ``part_size``, so the plan still holds the output."""
        if not self._zero_copy_max:
            return None
        if self._ladder is None:
            self._ladder = ZeroLadder(self._client, self.location, self._request_at, content_md5,
                                      rung_sizes(self.part_base, self._zero_copy_max))
        return await self._ladder.copy_for(length, part_size)

    def _zero_part(self, size: int) -> bytes:
        if len(self._zero[0]) != size:  # part sizes only grow: one size at a time is kept
            zeros = bytes(size)
            self._zero = (zeros, content_md5(zeros))
        return self._zero[0]

    async def _content_md5(self, data: Buffer) -> str:
        zeros, md5 = self._zero
        if data is zeros:
            return md5
        return await asyncio.to_thread(content_md5, data)

    async def _write_at(self, offset: int, data: bytes) -> None:
        assert offset == self._part_offset + len(self._part), "sinks are written in order"
        self._part += data
        while len(self._part) >= (size := part_size(self._part_index, self.part_base)):
            part, self._part = self._part, bytearray(self._part[size:])  # copies only the overshoot
            del part[size:]
            index, start = self._part_index, self._part_offset
            self._part_index += 1
            self._part_offset += size
            if self._awaits_fill(start, size):
                self._held[index] = (start, part)
            else:
                await self._upload(index, part)

    async def _upload(self, index: int, data: Buffer) -> None:
        """Start uploading part ``index`` once slots are free (the writer waits: back pressure)."""
        if await self._uploaded_before(index + 1, data):
            return
        await self._launch(self._weight(len(data)), partial(self._upload_part, index + 1, data))

    async def _launch(self, weight: int, start: Callable[[int], Awaitable[None]]) -> None:
        """Run ``start(weight)`` as a task once ``weight`` slots are free, the upload created first."""
        self._raise_failed()
        for _ in range(weight):  # one writer acquires at a time, so partial holds cannot deadlock
            await self._slots.acquire()
        try:
            if self._upload_id is None:
                created = await self._request(
                    "s3:PutObject (CreateMultipartUpload)", "CreateMultipartUpload",
                    lambda: self._client.create_multipart_upload(Bucket=self.location.bucket,
                                                                 Key=self.location.key))
                self._upload_id = str(created["UploadId"])
                if self.on_upload is not None:
                    await self.on_upload(self._upload_id)
        except BaseException:
            self._release(weight)
            raise
        task = asyncio.ensure_future(start(weight))
        self._tasks.add(task)

    async def _uploaded_before(self, number: int, data: Buffer) -> bool:
        """Resumable mode: whether an earlier attempt uploaded exactly these bytes as part ``number``."""
        earlier = self._done_before.pop(number, None)
        if earlier is None:
            return False
        etag, size = earlier
        if size != len(data):
            return False
        plain = md5_of_etag(etag)
        if plain is not None:  # a plain MD5 ETag: compare
            digest = await asyncio.to_thread(lambda: hashlib.md5(data, usedforsecurity=False).hexdigest())
            if digest != plain:
                return False
        self._etags[number] = etag
        self.parts_skipped += 1
        return True

    def _weight(self, size: int) -> int:
        """Slots a part takes: one per base part it holds, so the bytes in flight stay bounded."""
        return min(self._slots_total, -(-size // self.part_base))

    def _release(self, weight: int) -> None:
        for _ in range(weight):
            self._slots.release()

    async def _upload_part(self, number: int, data: Buffer, weight: int) -> None:
        metrics.PARTS_IN_FLIGHT.inc()
        metrics.BUFFERED_BYTES.inc(len(data))
        try:
            md5 = await self._content_md5(data)
            response = await self._request(
                "s3:PutObject (UploadPart)", f"UploadPart {number} of",
                lambda: self._client.upload_part(Bucket=self.location.bucket, Key=self.location.key,
                                                 UploadId=self._upload_id, PartNumber=number,
                                                 Body=data, ContentMD5=md5))
            self._part_done(number, str(response["ETag"]), len(data))
        finally:
            metrics.PARTS_IN_FLIGHT.dec()
            metrics.BUFFERED_BYTES.dec(len(data))
            self._release(weight)

    async def _copy_part(self, number: int, copy: ZeroCopy, weight: int) -> None:
        """Part ``number``: a copy of a scratch object of zeros, made inside the server."""
        metrics.PARTS_IN_FLIGHT.inc()
        try:
            assert self._upload_id is not None  # created before any part is launched
            etag = await copy_zeros(self._client, self._request_at, self.location, self._upload_id, number, copy)
            self._part_done(number, etag, copy.size)
        finally:
            metrics.PARTS_IN_FLIGHT.dec()
            self._release(weight)

    def _part_done(self, number: int, etag: str, size: int) -> None:
        self._etags[number] = etag
        if self.on_part is not None:
            self.on_part(number, etag, size)

    def _raise_failed(self) -> None:
        for task in [t for t in self._tasks if t.done()]:
            self._tasks.discard(task)
            if not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]

    async def _drain(self) -> None:
        while self._tasks:
            await asyncio.wait(self._tasks, return_when=asyncio.FIRST_EXCEPTION)
            self._raise_failed()

    # -- commit and abort

    async def _finish(self, size: int) -> None:
        if self._upload_id is None and not self._held and self._part_index == 0:
            await self._put(self._part)
        else:
            if self._part:
                await self._upload(self._part_index, self._part)
            self._part = bytearray()
            for index, (_, part) in sorted(self._held.items()):
                await self._upload(index, part)
            self._held.clear()
            await self._drain()
            await self._complete()
        await self._verify(size)
        await self._remove_scratch()
        await self._stack.aclose()

    async def _remove_scratch(self) -> None:
        if self._ladder is not None:
            await self._ladder.remove()

    async def _put(self, data: bytearray) -> None:
        md5 = await asyncio.to_thread(content_md5, data)
        self._object_written = True
        response = await self._request("s3:PutObject", "PutObject", lambda: self._client.put_object(
            Bucket=self.location.bucket, Key=self.location.key, Body=data, ContentMD5=md5))
        self._object_etag = str(response["ETag"])

    async def _complete(self) -> None:
        numbered = sorted(self._etags.items())
        parts = [{"PartNumber": n, "ETag": e} for n, e in numbered]
        self._object_written = True
        response = await self._request("s3:PutObject (CompleteMultipartUpload)", "CompleteMultipartUpload",
                                       lambda: self._client.complete_multipart_upload(
                                           Bucket=self.location.bucket, Key=self.location.key,
                                           UploadId=self._upload_id, MultipartUpload={"Parts": parts}))
        self._upload_id = None
        self._object_etag = multipart_etag([etag for _, etag in numbered]) or str(response["ETag"])

    async def _verify(self, size: int) -> None:
        """The object now in place has the size written, and the checksum (ETag) of the parts sent."""
        head = await self._request("s3:GetObject (HeadObject)", "HeadObject", lambda: (
            self._client.head_object(Bucket=self.location.bucket, Key=self.location.key)))
        if int(head["ContentLength"]) != size:
            raise StorageError(f"{self.location}: uploaded {size} bytes but the object holds "
                               f"{head['ContentLength']}", reason="s3.size")
        if self._object_etag is not None and str(head["ETag"]) != self._object_etag:
            self._object_written = False  # another writer's object now: abort must not delete it
            raise StorageError(f"{self.location}: the object's ETag is {head['ETag']}, not the "
                               f"{self._object_etag} of the bytes uploaded (replaced while it was written?)",
                               reason="s3.checksum")

    async def detach(self) -> None:
        """Stop the uploads in flight and let go, keeping the multipart upload for :meth:`resume`
        (the scratch objects of zeros go: a resumed upload makes them again)."""
        try:
            await self._stop_uploads()
        finally:
            await self._let_go()

    async def abort(self) -> None:
        """Stop the uploads in flight, abort the multipart upload, and remove an object this sink wrote."""
        try:
            await self._stop_uploads()
            if self._upload_id is not None:
                upload_id, self._upload_id = self._upload_id, None
                try:
                    await self._request("s3:AbortMultipartUpload", "AbortMultipartUpload",
                                        lambda: self._client.abort_multipart_upload(
                                            Bucket=self.location.bucket, Key=self.location.key,
                                            UploadId=upload_id))
                except StorageError as exc:
                    if exc.reason != "s3.not_found":  # gone already (completed before a lost answer)
                        raise
            if self._object_written:
                await self._request("s3:DeleteObject", "DeleteObject", lambda: self._client.delete_object(
                    Bucket=self.location.bucket, Key=self.location.key))
        finally:
            await self._let_go()

    async def _stop_uploads(self) -> None:
        await cancel_and_wait(*self._tasks)
        self._tasks.clear()

    async def _let_go(self) -> None:
        """Remove the scratch objects of zeros, drop the parts held in memory, close the client."""
        try:
            await self._remove_scratch()
        finally:
            self._part = bytearray()
            self._held.clear()
            await self._stack.aclose()
