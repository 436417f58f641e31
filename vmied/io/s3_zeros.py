"""Zeros copied inside the server: long runs of zeros in a multipart output become UploadPartCopy parts.

An S3 object has no holes, so a raw output (or a fixed VHD) of a mostly empty disk is mostly zeros,
and uploading them costs as much as uploading data: 6.5 of the 8 GiB of the benchmark disk. S3 can
make a part by copying another object (UploadPartCopy), inside the server. The sink keeps a ladder
of scratch objects of zeros beside the output, and covers each long run of zeros with whole-object
copies of its rungs, largest first (the rest of a run is uploaded as before)::

    rung 0   8 x part base  (64 MiB)    a multipart upload of 8 parts sent from the shared zero buffer
    rung 1   8 x rung 0     (512 MiB)   8 UploadPartCopy of rung 0
    rung n   8 x rung n-1               ... while it stays within ``zero_copy_max``

Whole objects, not ranges, so a server need not support ``x-amz-copy-source-range``. The first rung
is uploaded in parts rather than PUT as one object: SeaweedFS copied objects made of uploaded parts
(and objects made of copies of them) at 1.6-5 GB/s, and a single-PUT object (and copies of it) at
0.3 GB/s, no faster than uploading the zeros.

Rungs are built when a run first needs them; the first one is copied once into a throwaway upload
to learn whether the server copies at all. Their keys are ``<output key>.vmied-zeros-<size>``, so
whoever knows the output can find them: the sink deletes them when it commits, aborts or detaches,
and :func:`remove_scratch` clears what a crash left (the objects, and rung uploads in progress).
Every copy names its rung's ETag (``x-amz-copy-source-if-match``): a scratch object replaced meanwhile
fails the part instead of copying someone else's bytes. Where the server refuses to build the ladder
(no UploadPartCopy, no right to read beside the output), the ladder switches itself off and zeros
are uploaded; a scratch object that cannot be deleted is logged with its key.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from ..errors import StorageError
from ..pipeline import gather_all
from .s3_config import S3Location

log = logging.getLogger("vmied.s3")

#: Each rung holds this many of the rung below (the first: this many zero parts of the part base).
RUNG_FACTOR = 8
SCRATCH_SUFFIX = ".vmied-zeros-"

#: ``request(location, action, what, call)``: one S3 request, retried and its failures sorted.
Request = Callable[[S3Location, str, str, Callable[[], Awaitable[Any]]], Awaitable[Any]]


def scratch_prefix(location: S3Location) -> S3Location:
    """Where the scratch objects of an output go (the key of each is this prefix and its size)."""
    return S3Location(location.bucket, location.key + SCRATCH_SUFFIX)


def rung_sizes(seed: int, largest: int) -> list[int]:
    """Sizes of the ladder's rungs, smallest first: seed x 8, x 64, ... up to ``largest``."""
    sizes = []
    size = seed * RUNG_FACTOR
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

    def copy_source(self) -> dict[str, str]:
        return {"Bucket": self.location.bucket, "Key": self.location.key}


class ZeroLadder:
    """The scratch objects of zeros of one output, built on demand (see the module's notes)."""

    def __init__(self, client: Any, output: S3Location, request: Request, seed: tuple[bytes, str],
                 largest: int) -> None:
        self._client = client
        self._prefix = scratch_prefix(output)
        self._request = request
        self._seed, self._seed_md5 = seed  # zeros of the part base, and their Content-MD5
        self._sizes = rung_sizes(len(self._seed), largest)
        self._rungs: list[Rung] = []
        self._written: list[S3Location] = []  # scratch objects that may exist: removed at the end
        self.enabled = bool(self._sizes)

    async def rung_for(self, length: int, at_least: int) -> Rung | None:
        """The largest rung no longer than ``length`` and no shorter than ``at_least``, built if it must be;
        None if there is none or the server refused to build the ladder."""
        fitting = [index for index, size in enumerate(self._sizes) if at_least <= size <= length]
        if not self.enabled or not fitting:
            return None
        index = fitting[-1]
        try:
            while len(self._rungs) <= index:
                self._rungs.append(await self._build(len(self._rungs)))
        except StorageError as exc:
            self.enabled = False
            log.warning("zeros of %s are uploaded, not copied: the server refused to build the scratch "
                        "object of zeros beside it (%s)", self._prefix, exc.message)
            await self.remove()
            return None
        return self._rungs[index]

    async def _build(self, index: int) -> Rung:
        """Rung ``index``: a multipart upload of 8 zero parts (the first), or of 8 copies of the rung below."""
        location = S3Location(self._prefix.bucket, f"{self._prefix.key}{self._sizes[index]}")
        upload_id = await self._create(location)
        try:
            make_part = self._zero_part if index == 0 else self._copy_part(self._rungs[index - 1])
            etags = await gather_all(*(make_part(location, upload_id, number)
                                       for number in range(1, RUNG_FACTOR + 1)))
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
        """Copy the first rung once into a throwaway upload: a server that cannot copy parts, or a writer
        that may not read beside the output, says so here, before any part of the output depends on it."""
        location = S3Location(self._prefix.bucket, self._prefix.key + "check")
        upload_id = await self._create(location)
        try:
            await self._copy_part(rung)(location, upload_id, 1)
        finally:
            await self._abort(location, upload_id)

    async def _create(self, location: S3Location) -> str:
        created = await self._request(location, "s3:PutObject (CreateMultipartUpload)", "CreateMultipartUpload",
                                      lambda: self._client.create_multipart_upload(
                                          Bucket=location.bucket, Key=location.key))
        return str(created["UploadId"])

    async def _zero_part(self, location: S3Location, upload_id: str, number: int) -> str:
        response = await self._request(location, "s3:PutObject (UploadPart)", f"UploadPart {number} of",
                                       lambda: self._client.upload_part(
                                           Bucket=location.bucket, Key=location.key, UploadId=upload_id,
                                           PartNumber=number, Body=self._seed, ContentMD5=self._seed_md5))
        return str(response["ETag"])

    def _copy_part(self, rung: Rung) -> Callable[[S3Location, str, int], Awaitable[str]]:
        return partial(copy_rung, self._client, self._request, rung=rung)

    async def _abort(self, location: S3Location, upload_id: str) -> None:
        try:
            await self._request(location, "s3:AbortMultipartUpload", "AbortMultipartUpload",
                                lambda: self._client.abort_multipart_upload(
                                    Bucket=location.bucket, Key=location.key, UploadId=upload_id))
        except StorageError as exc:
            log.warning("could not abort the upload of the scratch object %s: %s", location, exc.message)

    async def remove(self) -> None:
        """Delete every scratch object this ladder made; a failure is logged, not raised (the output is
        what counts, and :func:`remove_scratch` finds what is left)."""
        self._rungs.clear()
        written, self._written = self._written, []
        for location in written:
            try:
                await self._request(location, "s3:DeleteObject", "DeleteObject",
                                    partial(self._client.delete_object, Bucket=location.bucket, Key=location.key))
            except StorageError as exc:
                log.warning("could not delete the scratch object %s: %s", location, exc.message)


async def copy_rung(client: Any, request: Request, location: S3Location, upload_id: str, number: int,
                    rung: Rung) -> str:
    """Part ``number`` of the upload of ``location``: a copy of ``rung``, made inside the server; its ETag."""
    response = await request(location, "s3:GetObject (UploadPartCopy)", f"UploadPartCopy {number} of",
                             lambda: client.upload_part_copy(
                                 Bucket=location.bucket, Key=location.key, UploadId=upload_id, PartNumber=number,
                                 CopySource=rung.copy_source(), CopySourceIfMatch=rung.etag))
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
