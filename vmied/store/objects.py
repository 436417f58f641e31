"""The object layer under the snapshot store: a local directory or an S3 bucket + prefix.

The store needs only: read a byte range, read a small object whole (bounded), write one object
sequentially (visible only once committed, nothing left on abort), delete, list. A local object is a
file under the root directory written through :class:`vmied.io.local.FileSink` (a hidden partial
file, fsync, rename, then an fsync of the directory). An S3 object is written through
:class:`vmied.io.s3.S3Sink` (one PUT, or a multipart upload aborted on failure); requests use the
same client construction, retries and error mapping as every other S3 access of vmied.

Keys are ``/``-separated and relative to the root; the store validates the names it builds.
"""

from __future__ import annotations

import asyncio
import errno
import os
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, suppress
from dataclasses import dataclass
from typing import Any, TypeVar

from ..errors import StorageError
from ..io.base import Sink
from ..io.local import FileSink
from ..io.retry import Retrier
from ..io.s3 import S3Sink, s3_call, s3_client
from ..io.s3_config import S3Config, S3Location
from .layout import SnapshotNotFound

T = TypeVar("T")
#: Keys per ListObjectsV2 page and per DeleteObjects request (the S3 maximum of both).
LIST_PAGE = DELETE_BATCH = 1000
#: Marker of a partial local object (vmied.io.local.FileSink's naming).
PARTIAL_MARK = ".vmied-partial-"


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    key: str
    size: int


class Objects(ABC):
    """Objects of one store; ``reads`` counts object reads (ranged or whole) for the tests and metrics."""

    name: str
    reads: int = 0

    @abstractmethod
    async def get(self, key: str, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes at ``offset`` (shorter only at the end of the object)."""

    @abstractmethod
    async def get_whole(self, key: str, limit: int) -> bytes:
        """The whole object; SnapshotNotFound when absent; StorageError when larger than ``limit``."""

    @abstractmethod
    async def create(self, key: str, expected_size: int) -> Sink:
        """A sink writing ``key`` in order; the object appears only on ``commit``."""

    async def put(self, key: str, data: bytes) -> None:
        sink = await self.create(key, len(data))
        try:
            await sink.write(data)
            await sink.commit()
        except BaseException:
            await sink.abort()
            raise

    @abstractmethod
    async def delete(self, key: str) -> None:
        """Remove ``key``; an absent key is not an error."""

    async def delete_many(self, keys: list[str]) -> None:
        """Remove ``keys`` (absent ones are not an error); backends with a batch call override this."""
        for key in keys:
            await self.delete(key)

    @abstractmethod
    def walk(self, prefix: str = "") -> AsyncIterator[ObjectInfo]:
        """Every object whose key starts with ``prefix`` (partial local files included), in key order,
        a page at a time: a listing of the whole store never has to fit in memory."""

    async def scan(self, prefix: str = "") -> list[ObjectInfo]:
        """:meth:`walk` as a list (for a prefix with few objects under it)."""
        return [info async for info in self.walk(prefix)]

    async def abort_uploads(self, prefix: str, keep: Callable[[str], bool]) -> list[str]:
        """Abort unfinished uploads under ``prefix`` whose key ``keep`` refuses; local files have none."""
        return []

    async def close(self) -> None:
        return None


# --- local directory ------------------------------------------------------------------------------

class LocalObjects(Objects):
    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        self.name = self.root

    @classmethod
    async def open(cls, root: str) -> LocalObjects:
        objects = cls(root)
        try:
            await objects._io(os.makedirs, objects.root, 0o750, True)
        except OSError as exc:
            raise StorageError(f"cannot create the snapshot store {root}: {exc.strerror or exc}",
                               reason="store.local") from None
        return objects

    async def _io(self, fn: Callable[..., T], *args: object) -> T:
        """File system calls run on the loop's default executor, never on the loop."""
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    def path(self, key: str) -> str:
        parts = key.split("/")
        if not key or any(part in ("", ".", "..") for part in parts):
            raise ValueError(f"bad object key {key!r}")
        return os.path.join(self.root, *parts)

    async def get(self, key: str, offset: int, length: int) -> bytes:
        self.reads += 1
        try:
            return await self._io(_pread_file, self.path(key), offset, length)
        except OSError as exc:
            raise _local_error(self.path(key), exc, "read") from None

    async def get_whole(self, key: str, limit: int) -> bytes:
        self.reads += 1
        try:
            return await self._io(_read_whole, self.path(key), limit)
        except OSError as exc:
            raise _local_error(self.path(key), exc, "read") from None

    async def create(self, key: str, expected_size: int) -> Sink:
        path = self.path(key)
        try:
            await self._io(os.makedirs, os.path.dirname(path), 0o750, True)
        except OSError as exc:
            raise _local_error(path, exc, "create") from None
        return await FileSink.create(path, sparse=False, sync=True)

    async def put(self, key: str, data: bytes) -> None:
        await super().put(key, data)
        try:
            await self._io(_fsync_directory, os.path.dirname(self.path(key)))  # the rename is durable
        except OSError as exc:
            raise _local_error(self.path(key), exc, "write") from None

    async def delete(self, key: str) -> None:
        try:
            await self._io(_unlink_and_prune, self.path(key), self.root)
        except OSError as exc:
            raise _local_error(self.path(key), exc, "delete") from None

    async def delete_many(self, keys: list[str]) -> None:
        paths = [self.path(key) for key in keys]

        def delete_all() -> None:
            for path in paths:
                _unlink_and_prune(path, self.root)

        try:
            await self._io(delete_all)
        except OSError as exc:
            raise _local_error(self.root, exc, "delete") from None

    async def walk(self, prefix: str = "") -> AsyncIterator[ObjectInfo]:
        """One top-level entry (a snapshot's directory) listed at a time."""
        try:
            for entry in await self._io(_entries, self.root):
                if entry.startswith(prefix) or prefix.startswith(entry):
                    for info in await self._io(_walk, self.root, entry, prefix):
                        yield info
        except OSError as exc:
            raise _local_error(self.root, exc, "list") from None


def _local_error(path: str, exc: OSError, doing: str) -> StorageError:
    if exc.errno == errno.ENOENT:
        return SnapshotNotFound(f"cannot {doing} {path}: no such file", reason="store.not_found")
    return StorageError(f"cannot {doing} {path}: {exc.strerror or exc}", reason=f"store.{doing}")


def _pread_file(path: str, offset: int, length: int) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while length > 0:
            chunk = os.pread(fd, length, offset)
            if not chunk:
                break
            chunks.append(chunk)
            offset += len(chunk)
            length -= len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _read_whole(path: str, limit: int) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise StorageError(f"{path} is {size} bytes, more than the {limit} it may hold", reason="store.too_large")
        return _pread_file(path, 0, size)
    finally:
        os.close(fd)


def _fsync_directory(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_and_prune(path: str, root: str) -> None:
    """Remove a file, then its directory when that leaves it empty (never the root)."""
    with suppress(FileNotFoundError):
        os.unlink(path)
    directory = os.path.dirname(path)
    if directory != root:
        with suppress(OSError):  # not empty, or gone
            os.rmdir(directory)


def _entries(root: str) -> list[str]:
    """The top-level names, a directory's with a "/" after it, in the order of the keys under them."""
    try:
        with os.scandir(root) as entries:
            return sorted(entry.name + "/" if entry.is_dir() else entry.name for entry in entries)
    except FileNotFoundError:
        return []


def _walk(root: str, entry: str, prefix: str) -> list[ObjectInfo]:
    """The objects at or under the top-level ``entry`` (as :func:`_entries` names it) whose keys start
    with ``prefix``, in key order."""
    path = os.path.join(root, entry.rstrip("/"))
    if not entry.endswith("/"):
        found = [(entry, path)]
    else:
        found = [(os.path.relpath(os.path.join(directory, name), root).replace(os.sep, "/"),
                  os.path.join(directory, name)) for directory, _, files in os.walk(path) for name in files]
    out = []
    for key, file in found:
        if key.startswith(prefix):
            try:
                out.append(ObjectInfo(key, os.stat(file).st_size))
            except FileNotFoundError:
                continue
    return sorted(out, key=lambda info: info.key)


# --- S3 bucket + prefix ---------------------------------------------------------------------------

class S3Objects(Objects):
    def __init__(self, config: S3Config, bucket: str, prefix: str, client: Any, stack: AsyncExitStack) -> None:
        self.config = config
        self.bucket = bucket
        self.prefix = prefix
        self.name = f"s3://{bucket}/{prefix}"
        self.retrier = Retrier(config.retry)
        self._client = client
        self._stack = stack

    @classmethod
    async def open(cls, config: S3Config, bucket: str, prefix: str = "") -> S3Objects:
        """Connect and check that the bucket answers (a daemon fails at start, not at the first import)."""
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        stack = AsyncExitStack()
        try:
            client = await s3_client(config, stack)
            objects = cls(config, bucket, prefix, client, stack)
            await objects._request("s3:ListBucket (HeadBucket)", "", lambda: client.head_bucket(Bucket=bucket))
        except BaseException:
            await stack.aclose()
            raise
        return objects

    def location(self, key: str) -> S3Location:
        return S3Location(self.bucket, self.prefix + key)

    async def _request(self, action: str, key: str, call: Callable[[], Awaitable[T]]) -> T:
        location = self.location(key)
        return await self.retrier.run(lambda: s3_call(location, action, call), f"{action} {location}")

    async def get(self, key: str, offset: int, length: int) -> bytes:
        self.reads += 1
        if length <= 0:
            return b""

        async def call() -> bytes:
            response = await self._client.get_object(Bucket=self.bucket, Key=self.prefix + key,
                                                     Range=f"bytes={offset}-{offset + length - 1}")
            async with response["Body"] as body:
                data: bytes = await body.read()
                return data

        try:
            return await self._request("s3:GetObject", key, call)
        except StorageError as exc:
            if "InvalidRange" in exc.message:  # the range starts beyond the end: nothing there
                return b""
            raise _not_found(exc) from None

    async def get_whole(self, key: str, limit: int) -> bytes:
        self.reads += 1

        async def call() -> bytes:
            response = await self._client.get_object(Bucket=self.bucket, Key=self.prefix + key)
            async with response["Body"] as body:
                if int(response["ContentLength"]) > limit:
                    raise StorageError(f"{self.location(key)} is {response['ContentLength']} bytes, more than the "
                                       f"{limit} it may hold", reason="store.too_large")
                data: bytes = await body.read()
                return data

        try:
            return await self._request("s3:GetObject", key, call)
        except StorageError as exc:
            raise _not_found(exc) from None

    async def create(self, key: str, expected_size: int) -> Sink:
        # the sink shares this client; its own exit stack is empty, so closing it closes nothing
        return S3Sink(self.location(key), self.config, self._client, AsyncExitStack(), expected_size)

    async def delete(self, key: str) -> None:
        await self._request("s3:DeleteObject", key,
                            lambda: self._client.delete_object(Bucket=self.bucket, Key=self.prefix + key))

    async def delete_many(self, keys: list[str]) -> None:
        """DeleteObjects, a thousand keys a request; a key the server could not delete is an error."""
        for first in range(0, len(keys), DELETE_BATCH):
            batch = keys[first : first + DELETE_BATCH]

            def delete_batch(batch: list[str] = batch) -> Awaitable[Any]:
                return self._client.delete_objects(  # type: ignore[no-any-return]
                    Bucket=self.bucket, Delete={"Objects": [{"Key": self.prefix + key} for key in batch],
                                                "Quiet": True})

            answer = await self._request("s3:DeleteObject (DeleteObjects)", batch[0], delete_batch)
            errors = answer.get("Errors") or []
            if errors:
                first_error = errors[0]
                raise StorageError(f"DeleteObjects on {self.name}: {len(errors)} keys not deleted (first: "
                                   f"{first_error.get('Key')}: {first_error.get('Code')} "
                                   f"{first_error.get('Message')})", reason="s3.error")

    async def walk(self, prefix: str = "") -> AsyncIterator[ObjectInfo]:
        """ListObjectsV2 pages (S3 lists keys in UTF-8 binary order)."""
        token: str | None = None
        while True:
            extra = {"ContinuationToken": token} if token else {}

            def list_page(extra: dict[str, str] = extra) -> Awaitable[Any]:
                return self._client.list_objects_v2(  # type: ignore[no-any-return]
                    Bucket=self.bucket, Prefix=self.prefix + prefix, MaxKeys=LIST_PAGE, **extra)

            page = await self._request("s3:ListBucket", prefix, list_page)
            for item in page.get("Contents", []):
                yield ObjectInfo(str(item["Key"])[len(self.prefix):], int(item["Size"]))
            if not page.get("IsTruncated"):
                return
            token = str(page["NextContinuationToken"])

    async def abort_uploads(self, prefix: str, keep: Callable[[str], bool]) -> list[str]:
        aborted: list[str] = []
        markers: dict[str, str] = {}
        while True:
            def list_uploads(markers: dict[str, str] = markers) -> Awaitable[Any]:
                return self._client.list_multipart_uploads(  # type: ignore[no-any-return]
                    Bucket=self.bucket, Prefix=self.prefix + prefix, **markers)

            page = await self._request("s3:ListBucketMultipartUploads", prefix, list_uploads)
            for upload in page.get("Uploads", []):
                key = str(upload["Key"])[len(self.prefix):]
                if keep(key):
                    continue
                upload_id = str(upload["UploadId"])
                def abort(key: str = key, upload_id: str = upload_id) -> Awaitable[Any]:
                    return self._client.abort_multipart_upload(  # type: ignore[no-any-return]
                        Bucket=self.bucket, Key=self.prefix + key, UploadId=upload_id)

                try:
                    await self._request("s3:AbortMultipartUpload", key, abort)
                except StorageError as exc:
                    if exc.reason != "s3.not_found":
                        raise
                aborted.append(key)
            if not page.get("IsTruncated"):
                return aborted
            markers = {"KeyMarker": str(page["NextKeyMarker"]), "UploadIdMarker": str(page["NextUploadIdMarker"])}

    async def close(self) -> None:
        await self._stack.aclose()


def _not_found(exc: StorageError) -> StorageError:
    if exc.reason == "s3.not_found":
        return SnapshotNotFound(exc.message, reason="store.not_found")
    return exc
