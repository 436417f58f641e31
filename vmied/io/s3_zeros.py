"""Zeros copied inside the server: runs of zeros in a multipart output become UploadPartCopy parts.

An S3 object has no holes, so a raw output (or a fixed VHD) of a mostly empty disk is mostly zeros,
and uploading them costs as much as uploading data: 6.5 of the 8 GiB of the benchmark disk. S3 can
make a part by copying another object, or a range of it (UploadPartCopy), inside the server. The
sink keeps a ladder of scratch objects of zeros beside the output::

    rung 0   8 x part base  (64 MiB)    a multipart upload of zeros in 5 MiB parts (see _upload_zeros)
    rung 1   8 x rung 0     (512 MiB)   8 UploadPartCopy of rung 0
    rung n   8 x rung n-1               ... while it stays within ``zero_copy_max``

and covers a run of zeros with copies: the run's first bytes from the smallest rung already built
that holds them (a range of it, or the whole), else the whole of the largest rung the run holds,
built then; what is left of the run is covered the same way while it makes a part (at least its
planned size), and a shorter rest is uploaded with the next part. A rung is built only for a run at
least as long, and copied by range once it is there. The first rung is uploaded in parts rather
than PUT as one object: SeaweedFS copied objects made of uploaded parts (and objects made of copies
of them, whole or by range) at 1.6-5 GB/s, and a single-PUT object (and copies of it) at 0.3 GB/s,
no faster than uploading the zeros.

When the first rung is built, a range of it is copied once into a throwaway upload, and ListParts must
show the part the size of the range: a server that cannot copy parts, that ignores
``x-amz-copy-source-range``, or a writer that may not read beside the output, says so there, before any
part of the output depends on it. Rung keys are ``<output key>.vmied-zeros-<size>``, so whoever knows
the output can find them: the sink deletes them when it commits, aborts or detaches, and
:func:`remove_scratch` clears what a crash left (the objects, and rung uploads in progress): an export
task's cleanup calls it, and so does a ladder that made scratch objects when it removes its own, so
that running a killed ``vmied convert`` again clears what the killed run left. Every copy
names its rung's ETag (``x-amz-copy-source-if-match``): a scratch object replaced meanwhile fails the
part instead of copying someone else's bytes. Where the server refuses the check, the ladder switches
itself off and zeros are uploaded; a scratch object that cannot be deleted is logged with its key.
"""

from __future__ import annotations

import asyncio
import logging
from bisect import bisect_right
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from ..errors import StorageError
from ..pipeline import gather_all
from .s3_config import MIN_PART, S3Location

log = logging.getLogger("vmied.s3")

#: Each rung holds this many of the rung below (the first: this many times the part base).
RUNG_FACTOR = 8
#: Bytes of the first rung copied into the throwaway upload: a range, and not a whole number of MiB,
#: so a server that ignores the range (and copies the whole rung) shows it in the part's size.
CHECK_RANGE = 1_000_003
SCRATCH_SUFFIX = ".vmied-zeros-"

#: ``request(location, action, what, call)``: one S3 request, retried and its failures sorted.
Request = Callable[[S3Location, str, str, Callable[[], Awaitable[Any]]], Awaitable[Any]]


def scratch_prefix(location: S3Location) -> S3Location:
    """Where the scratch objects of an output go (the key of each is this prefix and its size)."""
    return S3Location(location.bucket, location.key + SCRATCH_SUFFIX)


def rung_sizes(part_base: int, largest: int) -> list[int]:
    """Sizes of the ladder's rungs, smallest first: part base x 8, x 64, ... up to ``largest``."""
    sizes = []
    size = part_base * RUNG_FACTOR
    while size <= largest:
        sizes.append(size)
        size *= RUNG_FACTOR
    return sizes


@dataclass(frozen=True, slots=True)
class Rung:
    """A scratch object of ``size`` zeros that parts are copied from."""

    location: S3Location
    size: int
    etag: str


@dataclass(frozen=True, slots=True)
class ZeroCopy:
    """A part of ``size`` zeros copied from the first ``size`` bytes of ``rung`` (the whole of it, or a range)."""

    rung: Rung
    size: int

    @classmethod
    def whole(cls, rung: Rung) -> ZeroCopy:
        return cls(rung, rung.size)

    def arguments(self) -> dict[str, Any]:
        """The UploadPartCopy arguments naming the source: the rung, its ETag, and the range if not whole."""
        source = {"Bucket": self.rung.location.bucket, "Key": self.rung.location.key}
        arguments: dict[str, Any] = {"CopySource": source, "CopySourceIfMatch": self.rung.etag}
        if self.size != self.rung.size:
            arguments["CopySourceRange"] = f"bytes=0-{self.size - 1}"
        return arguments


class ZeroLadder:
    """The scratch objects of zeros of one output, built on demand (see the module's notes)."""

    def __init__(self, client: Any, output: S3Location, request: Request, content_md5: Callable[[bytes], str],
                 sizes: list[int]) -> None:
        self._client = client
        self._output = output
        self._prefix = scratch_prefix(output)
        self._request = request
        self._content_md5 = content_md5
        #: sizes of the rungs, smallest first (:func:`rung_sizes`): cut at a refused rung, so none
        #: when the ladder is off
        self._sizes = list(sizes)
        self._rungs: list[Rung] = []
        self._written: list[S3Location] = []  # scratch objects that may exist: removed at the end

    async def copy_for(self, length: int, at_least: int) -> ZeroCopy | None:
        """The next copy for a run of ``length`` zeros whose part is planned ``at_least`` long: the run's
        first bytes from the smallest rung already built that holds them, else the whole of the largest
        rung the run holds (built now); None if the run is too short, the ladder is off (refused), or
        the run is too short to start it."""
        size = min(length, self._sizes[-1]) if self._sizes else 0
        if size < at_least:
            return None
        if holding := [rung for rung in self._rungs if rung.size >= size]:
            return ZeroCopy(holding[0], size)
        index = bisect_right(self._sizes, length) - 1  # the largest rung within the run
        if index < 0 or self._sizes[index] < at_least or not await self._grow(index):
            return None
        rung = self._rungs[min(index, len(self._rungs) - 1)]  # a larger rung may have been refused
        return ZeroCopy.whole(rung) if rung.size >= at_least else None

    async def _grow(self, index: int) -> bool:
        """Build the rungs up to ``index``; False if the ladder is off. A refused first rung turns it off
        and removes what it made (nothing was copied from it yet); a refused larger one only stops its
        growth, as copies of the rungs built may be in flight."""
        try:
            while len(self._rungs) <= index:
                self._rungs.append(await self._build(len(self._rungs)))
        except StorageError as exc:
            del self._sizes[len(self._rungs):]
            if self._rungs:
                log.warning("zeros of %s are copied from scratch objects of zeros of at most %d bytes: the "
                            "server refused to build a larger one (%s)", self._prefix, self._sizes[-1], exc.message)
                return True
            log.warning("zeros of %s are uploaded, not copied: the server refused to build or copy the "
                        "scratch object of zeros beside it (%s)", self._prefix, exc.message)
            await self.remove()
            return False
        return True

    async def _build(self, index: int) -> Rung:
        """Rung ``index``: a multipart upload of zeros (the first), or of 8 copies of the rung below."""
        location = S3Location(self._prefix.bucket, f"{self._prefix.key}{self._sizes[index]}")
        upload_id = await self._create(location)
        try:
            if index == 0:
                etags = await self._upload_zeros(location, upload_id, self._sizes[0])
            else:
                copy = self._copy_part(ZeroCopy.whole(self._rungs[index - 1]))
                etags = await gather_all(*(copy(location, upload_id, number) for number in range(1, RUNG_FACTOR + 1)))
            parts = [{"PartNumber": number, "ETag": etag} for number, etag in enumerate(etags, 1)]
            self._written.append(location)
            await self._request(location, "s3:PutObject (CompleteMultipartUpload)", "CompleteMultipartUpload",
                                lambda: self._client.complete_multipart_upload(
                                    Bucket=location.bucket, Key=location.key, UploadId=upload_id,
                                    MultipartUpload={"Parts": parts}))
        except BaseException:
            await self._abort(location, upload_id)
            raise
        head = await self._request(location, "s3:GetObject (HeadObject)", "HeadObject",
                                   lambda: self._client.head_object(Bucket=location.bucket, Key=location.key))
        if int(head["ContentLength"]) != self._sizes[index]:
            raise StorageError(f"{location}: the scratch object of zeros holds {head['ContentLength']} bytes, "
                               f"not {self._sizes[index]}", reason="s3.size")
        rung = Rung(location, self._sizes[index], str(head["ETag"]))
        if index == 0:
            await self._check_copies(rung)
        return rung

    async def _check_copies(self, rung: Rung) -> None:
        """Copy a range of the first rung once into a throwaway upload: a server that cannot copy parts
        or ignores the range, or a writer that may not read beside the output, says so here, before any
        part of the output depends on it."""
        location = S3Location(self._prefix.bucket, self._prefix.key + "check")
        upload_id = await self._create(location)
        try:
            await self._copy_part(ZeroCopy(rung, CHECK_RANGE))(location, upload_id, 1)
            listed = await self._request(location, "s3:ListMultipartUploadParts", "ListParts",
                                         lambda: self._client.list_parts(Bucket=location.bucket, Key=location.key,
                                                                         UploadId=upload_id))
            sizes = [int(part["Size"]) for part in listed.get("Parts", [])]
            if sizes != [CHECK_RANGE]:
                raise StorageError(f"{location}: a copy of the first {CHECK_RANGE} bytes of {rung.location} "
                                   f"made a part of {sizes} bytes (the server ignores x-amz-copy-source-range)",
                                   reason="s3.copy_range")
        finally:
            await self._abort(location, upload_id)

    async def _create(self, location: S3Location) -> str:
        created = await self._request(location, "s3:PutObject (CreateMultipartUpload)", "CreateMultipartUpload",
                                      lambda: self._client.create_multipart_upload(
                                          Bucket=location.bucket, Key=location.key))
        return str(created["UploadId"])

    async def _upload_zeros(self, location: S3Location, upload_id: str, size: int) -> list[str]:
        """``size`` zeros uploaded as parts of S3's smallest size, the last one shorter: their ETags.
        Small parts, because SeaweedFS copies an object chunk by chunk, in parallel: its 512 MiB rungs
        copied at 2.5 GB/s from 5 MiB parts, 1.9 from 8 MiB and 1.4 from 16 MiB (one 64 MiB part: 0.3)."""
        sizes = [MIN_PART] * (size // MIN_PART) + ([size % MIN_PART] if size % MIN_PART else [])
        bodies = {piece: bytes(piece) for piece in set(sizes)}
        md5s = {piece: await asyncio.to_thread(self._content_md5, body) for piece, body in bodies.items()}

        async def upload(number: int, piece: int) -> str:
            response = await self._request(location, "s3:PutObject (UploadPart)", f"UploadPart {number} of",
                                           lambda: self._client.upload_part(
                                               Bucket=location.bucket, Key=location.key, UploadId=upload_id,
                                               PartNumber=number, Body=bodies[piece], ContentMD5=md5s[piece]))
            return str(response["ETag"])

        return await gather_all(*(upload(number, piece) for number, piece in enumerate(sizes, 1)))

    def _copy_part(self, copy: ZeroCopy) -> Callable[[S3Location, str, int], Awaitable[str]]:
        return partial(copy_zeros, self._client, self._request, copy=copy)

    async def _abort(self, location: S3Location, upload_id: str) -> None:
        try:
            await self._request(location, "s3:AbortMultipartUpload", "AbortMultipartUpload",
                                lambda: self._client.abort_multipart_upload(
                                    Bucket=location.bucket, Key=location.key, UploadId=upload_id))
        except StorageError as exc:
            log.warning("could not abort the upload of the scratch object %s: %s", location, exc.message)

    async def remove(self) -> None:
        """Delete every scratch object this ladder made, then (if it made any) what an earlier conversion
        of the same output left when it was killed outright, so that running the command again cleans
        up after it. A failure is logged, not raised: the output is what counts, and
        :func:`remove_scratch` finds what is left."""
        self._rungs.clear()
        written, self._written = self._written, []
        for location in written:
            try:
                await self._request(location, "s3:DeleteObject", "DeleteObject",
                                    partial(self._client.delete_object, Bucket=location.bucket, Key=location.key))
            except StorageError as exc:
                log.warning("could not delete the scratch object %s: %s", location, exc.message)
        if written:
            try:
                await remove_scratch(self._client, self._output, self._request)
            except StorageError as exc:
                log.warning("could not look for scratch objects of zeros left beside %s by an interrupted "
                            "conversion: %s", self._output, exc.message)


async def copy_zeros(client: Any, request: Request, location: S3Location, upload_id: str, number: int,
                     copy: ZeroCopy) -> str:
    """Part ``number`` of the upload of ``location``: ``copy``, made inside the server; its ETag."""
    response = await request(location, "s3:GetObject (UploadPartCopy)", f"UploadPartCopy {number} of",
                             lambda: client.upload_part_copy(
                                 Bucket=location.bucket, Key=location.key, UploadId=upload_id, PartNumber=number,
                                 **copy.arguments()))
    return str(response["CopyPartResult"]["ETag"])


async def remove_scratch(client: Any, output: S3Location, request: Request) -> None:
    """Delete the scratch objects of ``output`` and abort their uploads (what a crash may have left)."""
    prefix = scratch_prefix(output)
    listing = await request(prefix, "s3:ListBucket", "ListObjectsV2", lambda: client.list_objects_v2(
        Bucket=prefix.bucket, Prefix=prefix.key))
    for item in listing.get("Contents", []):
        location = S3Location(prefix.bucket, str(item["Key"]))
        await request(location, "s3:DeleteObject", "DeleteObject",
                      partial(client.delete_object, Bucket=location.bucket, Key=location.key))
    uploads = await request(prefix, "s3:ListBucketMultipartUploads", "ListMultipartUploads",
                            lambda: client.list_multipart_uploads(Bucket=prefix.bucket, Prefix=prefix.key))
    for upload in uploads.get("Uploads", []):
        location = S3Location(prefix.bucket, str(upload["Key"]))
        await request(location, "s3:AbortMultipartUpload", "AbortMultipartUpload",
                      partial(client.abort_multipart_upload, Bucket=location.bucket, Key=location.key,
                              UploadId=upload["UploadId"]))
