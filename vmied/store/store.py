"""The snapshot store (design §4): write a disk once as packs + a manifest, read it back any way.

Writing (:meth:`SnapshotStore.write`)::

    extents ─▶ checked ─▶ passable (DEFLATED in other grain sizes inflated) ─▶ aligned to 64 KiB
            ─▶ batches of ~2 MiB ─▶ encode in the worker pool, in order, ``depth`` batches in flight:
                 DATA: zero grains dropped (zero_grains), the rest deflated (vmied.codec.deflate)
                 DEFLATED 64 KiB: inflated only to verify (length, Adler-32) and find zero grains;
                                  the zlib streams themselves are stored as they came
               each stored grain gets the CRC-32C of its compressed bytes
            ─▶ (SHA-256 of the virtual disk, one ordered thread) ─▶ packs, written sequentially,
               sealed with their index at ``pack_size`` and committed ``packs_in_flight`` at a time
            ─▶ manifest, written last (local rename / S3 PUT): only now does the snapshot exist

Any failure or cancellation aborts the open pack (S3: its multipart upload), waits for the packs
being committed, and deletes every object of the snapshot: nothing is left.

Reading: the manifest is read whole once (cached); a pack's index is one ranged read (cached,
bounded); a run of grains is one ranged read. :meth:`SnapshotStore.read` of a range inside one pack
therefore costs at most two object reads. :meth:`SnapshotStore.open` streams ZERO and DEFLATED
extents (64 KiB grains) in windows of ``window`` bytes, ``readahead`` of them in flight.
"""

from __future__ import annotations

import asyncio
import logging
from bisect import bisect_left
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Iterable, Mapping
from dataclasses import dataclass, field

from .. import codec
from ..errors import StorageError, UsageError
from ..extents import Buffer, Extent, Kind, aligned, checked, whole_grain
from ..fastio import is_zero, zero_grains
from ..formats.base import ImageInfo, Reader
from ..io.base import Sink, Source
from ..metrics import STORE_BYTES, STORE_GRAINS
from ..pipeline import DEFAULT_DEPTH, OrderedDigest, Progress, Workers, cancel_and_wait, ordered_map, prefetch
from .layout import (
    GRAIN_SIZE,
    MANIFEST_NAME,
    MAX_GRAINS_PER_PACK,
    MAX_INDEX_BYTES,
    MAX_MANIFEST_BYTES,
    MAX_PACK_SIZE,
    MAX_PACKS,
    MAX_VIRTUAL_SIZE,
    CorruptSnapshot,
    Manifest,
    PackEntry,
    PackIndex,
    SnapshotNotFound,
    check_snapshot_id,
    crc32c,
    encode_index,
    encode_manifest,
    grain_count,
    index_size,
    pack_name,
    pack_number,
    parse_index,
    parse_manifest,
    verify_grains,
)
from .objects import PARTIAL_MARK, Objects

log = logging.getLogger(__name__)
MiB = 1 << 20
TiB = 1 << 40
#: Virtual bytes of data handed to one encode job.
BATCH_BYTES = 2 * MiB
#: Grains per DEFLATED extent a reader yields (4 MiB virtual, like the VMDK stream reader).
EXTENT_GRAINS = 64
#: Largest single read(): the caller asks for a range of a disk, not the disk.
MAX_READ = 256 * MiB
#: Manifests read at once by the garbage collection, which reads every kept snapshot's at each start.
GC_MANIFESTS_IN_FLIGHT = 16


@dataclass(frozen=True)
class StoreOptions:
    """Sizes that bound the store's memory (none of them grows with the disk)."""

    pack_size: int = 64 * MiB  # compressed grain bytes per pack before it is sealed
    packs_in_flight: int = 2  # packs being committed while the next one fills
    window: int = 8 * MiB  # one ranged read of a sequential pass
    readahead: int = 4  # ranged reads in flight ahead of the consumer
    depth: int = DEFAULT_DEPTH  # encode batches in flight
    index_cache_bytes: int = 32 * MiB  # pack indices kept for random reads
    manifest_cache: int = 8  # manifests kept
    #: The SHA-256 of the virtual disk is computed up to this virtual size (it costs a hash of every
    #: byte, zeros included, on one core: about 1.5 GB/s); larger snapshots record none.
    digest_max_size: int = 1 * TiB

    def __post_init__(self) -> None:
        if not 1 <= self.pack_size <= MAX_PACK_SIZE // 2:
            raise UsageError(f"store pack size {self.pack_size} is out of range (1 byte to {MAX_PACK_SIZE // 2})")
        if min(self.packs_in_flight, self.window, self.readahead, self.depth, self.manifest_cache) < 1:
            raise UsageError("store packs in flight, window, read-ahead, depth and caches must be positive")


@dataclass(frozen=True)
class StoredSnapshot:
    snapshot_id: str
    virtual_size: int
    stored_bytes: int  # every object of the snapshot: packs (grains + indices) and the manifest
    data_grains: int  # 64 KiB grains stored (all-zero ones are not)
    sha256: str | None  # of the virtual disk; None above StoreOptions.digest_max_size
    pack_count: int
    grain_size: int = GRAIN_SIZE

    @classmethod
    def of(cls, manifest: Manifest) -> StoredSnapshot:
        return cls(manifest.snapshot_id, manifest.virtual_size, manifest.stored_bytes, manifest.data_grains,
                   manifest.sha256, manifest.pack_count)


# --- encoding (worker jobs: pure functions) -------------------------------------------------------

@dataclass
class Encoded:
    """What one batch becomes: stored grains (number, zlib stream, CRC-32C) and its plain bytes."""

    end: int  # virtual offset the batch reaches
    grains: list[tuple[int, bytes, int]]
    plain: list[Buffer | int]  # for the digest, in order: bytes, or a count of zero bytes


def encode_batch(extents: list[Extent], keep_plain: bool) -> Encoded:
    """Worker job: the stored grains of grain-aligned ZERO / DATA / DEFLATED (64 KiB) extents.

    ``keep_plain``: also hand back the plain bytes, for the digest.
    """
    out = Encoded(extents[-1].end, [], [])
    for extent in extents:
        first = extent.offset // GRAIN_SIZE
        if extent.kind is Kind.ZERO:
            out.plain.append(extent.length)
        elif extent.kind is Kind.DATA:
            assert extent.data is not None
            out.plain.append(extent.data)
            view = memoryview(extent.data)
            flags = zero_grains(view, GRAIN_SIZE)
            for number, zero in enumerate(flags):
                if not zero:
                    grain = whole_grain(view[number * GRAIN_SIZE : (number + 1) * GRAIN_SIZE], GRAIN_SIZE)
                    _store(out, first + number, codec.deflate(grain))
        else:
            plains = codec.inflate_grains(extent.grains, GRAIN_SIZE, extent.length)  # verifies every grain
            if keep_plain:
                out.plain.extend(plains)
            for number, (stream, plain) in enumerate(zip(extent.grains, plains, strict=True)):
                if is_zero(plain):
                    continue
                # pass-through; only a short last grain (odd-sized disk) is deflated again, whole
                # (a copy: a grain may be a view into a source window the pack must not keep alive)
                _store(out, first + number,
                       bytes(stream) if len(plain) == GRAIN_SIZE else codec.deflate(whole_grain(plain, GRAIN_SIZE)))
    return out


def _store(out: Encoded, grain: int, stream: bytes) -> None:
    out.grains.append((grain, stream, crc32c(stream)))


def _passable(extent: Extent, virtual_size: int) -> bool:
    """A DEFLATED extent the store can keep as it is: 64 KiB grains on grain boundaries."""
    return (extent.grain_size == GRAIN_SIZE and extent.offset % GRAIN_SIZE == 0
            and len(extent.grains) == grain_count(extent.length)
            and (extent.length % GRAIN_SIZE == 0 or extent.end == virtual_size))


def inflate_run(out: bytearray, offset: int, grains: list[int], streams: list[bytes]) -> None:
    """Worker job: inflate grains and copy what of each lies in ``out`` (which starts at virtual ``offset``)."""
    end = offset + len(out)
    for grain, stream in zip(grains, streams, strict=True):
        start = grain * GRAIN_SIZE
        lo, hi = max(start, offset), min(start + GRAIN_SIZE, end)
        out[lo - offset : hi - offset] = memoryview(codec.inflate(stream, GRAIN_SIZE))[lo - start : hi - start]


# --- the store ------------------------------------------------------------------------------------

class SnapshotStore:
    def __init__(self, objects: Objects, workers: Workers, options: StoreOptions | None = None) -> None:
        self.objects = objects
        self.workers = workers
        self.options = options or StoreOptions()
        self._writing: set[str] = set()
        self._manifests: OrderedDict[str, Manifest] = OrderedDict()
        self._indices: OrderedDict[tuple[str, int], PackIndex] = OrderedDict()
        self._index_bytes = 0

    # writing

    async def write(self, snapshot_id: str, extents: AsyncIterator[Extent], virtual_size: int,
                    progress: Progress | None = None) -> StoredSnapshot:
        """Store the disk as ``snapshot_id``; all or nothing (aborted and removed on error or cancel)."""
        check_snapshot_id(snapshot_id)
        if not 0 <= virtual_size <= MAX_VIRTUAL_SIZE:
            raise UsageError(f"a stored snapshot is at most {MAX_VIRTUAL_SIZE} bytes, not {virtual_size}")
        if snapshot_id in self._writing:
            raise StorageError(f"snapshot {snapshot_id} is being written already", reason="store.busy")
        self._writing.add(snapshot_id)
        try:
            await self._clear_leftovers(snapshot_id)
            writer = _SnapshotWriter(self, snapshot_id, virtual_size, progress or Progress(virtual_size))
            try:
                stored = await writer.run(extents)
            except BaseException:
                await asyncio.shield(asyncio.ensure_future(writer.abort()))
                raise
            STORE_BYTES.inc(stored.stored_bytes)
            STORE_GRAINS.inc(stored.data_grains)
            return stored
        finally:
            self._writing.discard(snapshot_id)

    async def _clear_leftovers(self, snapshot_id: str) -> None:
        """Refuse an existing snapshot; remove what an interrupted earlier write of this id left."""
        infos = await self.objects.scan(f"{snapshot_id}/")
        if any(info.key == f"{snapshot_id}/{MANIFEST_NAME}" for info in infos):
            raise StorageError(f"snapshot {snapshot_id} exists already (stored snapshots are immutable)",
                               reason="store.exists")
        if infos:
            log.info("snapshot %s: removing %d objects of an interrupted write", snapshot_id, len(infos))
            await self._remove_all(snapshot_id)

    # reading

    async def stat(self, snapshot_id: str) -> StoredSnapshot:
        return StoredSnapshot.of(await self.manifest(snapshot_id))

    async def manifest(self, snapshot_id: str) -> Manifest:
        check_snapshot_id(snapshot_id)
        manifest = self._manifests.get(snapshot_id)
        if manifest is None:
            try:
                data = await self.objects.get_whole(f"{snapshot_id}/{MANIFEST_NAME}", MAX_MANIFEST_BYTES)
            except SnapshotNotFound:
                raise SnapshotNotFound(f"no stored snapshot {snapshot_id} in {self.objects.name}") from None
            except StorageError as exc:
                if exc.reason == "store.too_large":
                    raise CorruptSnapshot(exc.message, reason="store.header") from None
                raise
            manifest = await self.workers.run(parse_manifest, data, snapshot_id)
            self._manifests[snapshot_id] = manifest
            while len(self._manifests) > self.options.manifest_cache:
                self._manifests.popitem(last=False)
        self._manifests.move_to_end(snapshot_id)
        return manifest

    async def index(self, manifest: Manifest, number: int) -> PackIndex:
        """Pack ``number``'s index: one ranged read, then kept (bounded by ``index_cache_bytes``)."""
        key = (manifest.snapshot_id, number)
        index = self._indices.get(key)
        if index is not None:
            self._indices.move_to_end(key)
            return index
        pack = manifest.pack(number)
        data = await self._get_pack(manifest, number, pack.index_offset, min(pack.index_length, MAX_INDEX_BYTES))
        index = await self.workers.run(parse_index, data, manifest.snapshot_id, number, pack)
        self._indices[key] = index
        self._index_bytes += index.nbytes
        while self._index_bytes > self.options.index_cache_bytes and len(self._indices) > 1:
            _, dropped = self._indices.popitem(last=False)
            self._index_bytes -= dropped.nbytes
        return index

    async def _get_pack(self, manifest: Manifest, number: int, offset: int, length: int) -> bytes:
        try:
            return await self.objects.get(f"{manifest.snapshot_id}/{pack_name(number)}", offset, length)
        except SnapshotNotFound:  # the manifest lists it: a pack gone from a complete snapshot is damage
            raise CorruptSnapshot(f"pack {number} of snapshot {manifest.snapshot_id} is missing",
                                  reason="store.missing") from None

    async def grains(self, manifest: Manifest, number: int, index: PackIndex, first: int, last: int
                     ) -> list[bytes]:
        """Index entries ``first..last`` of a pack: one ranged read, every grain's CRC-32C checked."""
        start, end = index.span(first, last)
        data = await self._get_pack(manifest, number, start, end - start)
        where = f"pack {number} of snapshot {manifest.snapshot_id}"
        return await self.workers.run(verify_grains, data, index, first, last, where)

    async def read(self, snapshot_id: str, offset: int, length: int) -> bytes:
        """``length`` bytes of the virtual disk at ``offset``: per pack touched, its index and one range."""
        manifest = await self.manifest(snapshot_id)
        if offset < 0 or length < 0 or offset + length > manifest.virtual_size or length > MAX_READ:
            raise UsageError(f"cannot read {length} bytes at {offset} of snapshot {snapshot_id} "
                             f"({manifest.virtual_size} bytes; at most {MAX_READ} per read)")
        out = bytearray(length)
        if not length:
            return bytes(out)
        first_grain, end_grain = offset // GRAIN_SIZE, grain_count(offset + length)
        jobs: list[Awaitable[None]] = []
        for number in manifest.packs_between(first_grain, end_grain):
            index = await self.index(manifest, number)
            first = bisect_left(index.grains, first_grain)
            last = bisect_left(index.grains, end_grain) - 1
            if first > last:
                continue
            streams = await self.grains(manifest, number, index, first, last)
            jobs.append(self.workers.run(inflate_run, out, offset, list(index.grains[first : last + 1]), streams))
        await asyncio.gather(*jobs)
        return bytes(out)

    async def open(self, snapshot_id: str) -> StoreReader:
        """A reader of the stored disk: ZERO and DEFLATED (64 KiB grain) extents in offset order."""
        return StoreReader(self, await self.manifest(snapshot_id))

    async def export(self, snapshot_id: str, sink: Sink, output_format: str, *,
                     options: Mapping[str, str] | None = None, progress: Progress | None = None) -> int:
        """Write the snapshot as an image (any vmied output format) into ``sink``, as vmied.convert does.

        The sink is committed on success and aborted otherwise; returns the bytes written. A VMDK
        stream passes the stored grains through; other formats inflate them in the worker pool.
        """
        from ..convert import tracked
        from ..formats import writer_class

        progress = progress or Progress()
        try:
            reader = await self.open(snapshot_id)
            writer = writer_class(output_format)(sink, reader.virtual_size, options or {}, self.workers)
            progress.virtual_size = reader.virtual_size
            fetched = prefetch(checked(reader.extents(), reader.virtual_size))
            stream = tracked(fetched, progress)
            try:
                await writer.write(stream)
            finally:  # a writer that stops early must not leave the read-ahead task running
                await _aclose(stream)
                await _aclose(fetched)
            await sink.commit()
        except BaseException:
            await sink.abort()
            raise
        progress.bytes_read = reader.bytes_read
        progress.bytes_written = sink.position
        return sink.position

    # removing

    async def delete(self, snapshot_id: str) -> None:
        """Remove the snapshot: the manifest first (it stops existing), then its packs. Idempotent."""
        check_snapshot_id(snapshot_id)
        if snapshot_id in self._writing:
            raise StorageError(f"snapshot {snapshot_id} is being written", reason="store.busy")
        try:
            held = await self.manifest(snapshot_id)
        except (CorruptSnapshot, SnapshotNotFound):
            held = None
        self._forget(snapshot_id)
        await self.objects.delete(f"{snapshot_id}/{MANIFEST_NAME}")
        if held is not None:
            STORE_BYTES.dec(held.stored_bytes)
            STORE_GRAINS.dec(held.data_grains)
        await self._remove_all(snapshot_id)

    async def _remove_all(self, snapshot_id: str) -> list[str]:
        prefix = f"{snapshot_id}/"
        removed = await self.objects.abort_uploads(prefix, lambda key: False)
        keys = [info.key for info in await self.objects.scan(prefix)]
        await self.objects.delete_many(keys)
        return removed + keys

    def _forget(self, snapshot_id: str) -> None:
        self._manifests.pop(snapshot_id, None)
        for key in [key for key in self._indices if key[0] == snapshot_id]:
            self._index_bytes -= self._indices.pop(key).nbytes

    async def snapshots(self) -> list[str]:
        """Ids of the complete snapshots (those whose manifest exists)."""
        return sorted([info.key.split("/")[0] async for info in self.objects.walk()
                       if _store_key(info.key) == MANIFEST_NAME])

    async def collect_garbage(self, keep: set[str]) -> list[str]:
        """Remove the objects of snapshots not in ``keep`` and the leftovers of interrupted writes.

        Only keys of the store's own shape (``<id>/manifest``, ``<id>/pack-N``, partial files) are
        touched, so a shared bucket prefix is safe. A kept snapshot without a manifest is an
        interrupted write and is removed; packs a kept manifest does not list are removed; a
        snapshot whose manifest cannot be parsed is left whole (never delete on doubt). Snapshots
        being written by this store are left alone. Returns the keys removed.
        """
        removed = await self.objects.abort_uploads(
            "", lambda key: key.split("/")[0] in self._writing or _store_key(key) is None)
        held_bytes = held_grains = 0

        async def judge(group: tuple[str, dict[str, int]]) -> tuple[str, dict[str, int], set[str], int]:
            snapshot_id, sizes = group
            wanted, grains = await self._wanted(snapshot_id, sizes) if snapshot_id in keep else (set(), 0)
            return snapshot_id, sizes, wanted, grains

        async for snapshot_id, sizes, wanted, grains in ordered_map(judge, self._groups(), GC_MANIFESTS_IN_FLIGHT):
            unwanted = [key for key in sizes if key not in wanted]
            await self.objects.delete_many(unwanted)
            removed += unwanted
            if not wanted:
                self._forget(snapshot_id)
            held_bytes += sum(size for key, size in sizes.items() if key in wanted)
            held_grains += grains
        STORE_BYTES.set(held_bytes)  # the store as it stands after the collection
        STORE_GRAINS.set(held_grains)
        if removed:
            log.info("snapshot store: collected %d objects", len(removed))
        return removed

    async def _groups(self) -> AsyncIterator[tuple[str, dict[str, int]]]:
        """The store's objects by snapshot (key: size), from a walk in key order, where a snapshot's keys
        are adjacent: a store of any size is collected with one snapshot's keys in memory at a time.
        Snapshots being written are left out. Were a listing ever out of order, a snapshot would come in
        several groups; :meth:`_wanted` asks for the manifest itself, so none of them loses a pack."""
        current, sizes = "", dict[str, int]()
        async for info in self.objects.walk():
            if _store_key(info.key) is None:
                continue
            snapshot_id = info.key.split("/")[0]
            if snapshot_id != current:
                if sizes and current not in self._writing:
                    yield current, sizes
                current, sizes = snapshot_id, {}
            sizes[info.key] = info.size
        if sizes and current not in self._writing:
            yield current, sizes

    async def _wanted(self, snapshot_id: str, keys: Iterable[str]) -> tuple[set[str], int]:
        """The keys of a kept snapshot that its manifest names, and its data grains (0 when unknown):
        none if it has no manifest (an interrupted write), all of ``keys`` if the manifest cannot be read."""
        try:
            manifest = await self.manifest(snapshot_id)
        except SnapshotNotFound:
            log.warning("snapshot %s has no manifest (an interrupted write): removing its packs", snapshot_id)
            return set(), 0
        except (CorruptSnapshot, StorageError) as exc:
            log.warning("snapshot %s: cannot read its manifest (%s); leaving its objects", snapshot_id, exc)
            return set(keys), 0
        packs = {f"{snapshot_id}/{pack_name(n)}" for n in range(manifest.pack_count)}
        return {f"{snapshot_id}/{MANIFEST_NAME}", *packs}, manifest.data_grains

    async def close(self) -> None:
        self._manifests.clear()
        self._indices.clear()
        await self.objects.close()


async def _aclose(stream: object) -> None:
    """Close an async generator (an ``async for`` that stops early does not)."""
    close = getattr(stream, "aclose", None)
    if close is not None:
        await close()


def _store_key(key: str) -> str | None:
    """The object name of a key of the store's shape, None for anything else."""
    snapshot_id, _, name = key.partition("/")
    try:
        check_snapshot_id(snapshot_id)
    except UsageError:
        return None
    if name == MANIFEST_NAME or pack_number(name) is not None:
        return name
    if name.startswith(".") and PARTIAL_MARK in name and "/" not in name:
        return name
    return None


# --- writing a snapshot ---------------------------------------------------------------------------

class _SnapshotWriter:
    def __init__(self, store: SnapshotStore, snapshot_id: str, virtual_size: int, progress: Progress) -> None:
        self.store = store
        self.options = store.options
        self.snapshot_id = snapshot_id
        self.virtual_size = virtual_size
        self.progress = progress
        self.packs: list[PackEntry] = []
        self._sink: Sink | None = None
        self._entries: list[tuple[int, int, int, int]] = []
        self._commits: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(self.options.packs_in_flight)

    async def run(self, extents: AsyncIterator[Extent]) -> StoredSnapshot:
        workers = self.store.workers
        digest = OrderedDigest(self.options.depth) if self.virtual_size <= self.options.digest_max_size else None
        # the source runs in its own task, so a slow source read never stalls the packs, nor the reverse
        source = prefetch(checked(extents, self.virtual_size), self.options.depth)
        passable = self._passable(source)
        stream = aligned(passable, GRAIN_SIZE)
        batches = _batches(stream)
        encoded_batches = ordered_map(lambda batch: workers.run(encode_batch, batch, digest is not None), batches,
                                      self.options.depth)
        try:
            async for encoded in encoded_batches:
                if digest is not None:
                    await digest.feed(encoded.plain)
                for grain, stream_bytes, crc in encoded.grains:
                    await self._add(grain, stream_bytes, crc)
                self.progress.advance(encoded.end)
            sha256 = await digest.hexdigest() if digest is not None else None
        finally:
            if digest is not None:
                digest.close()
            # outside in: stop the jobs in flight and the source's read-ahead task now, not at GC
            for generator in (encoded_batches, batches, stream, passable, source):
                await _aclose(generator)
        await self._seal()
        await self._drain()
        self.progress.check()
        manifest = encode_manifest(self.snapshot_id, self.virtual_size, self.packs, sha256)
        await self.store.objects.put(f"{self.snapshot_id}/{MANIFEST_NAME}", manifest)
        self.progress.bytes_written += len(manifest)
        stored = sum(p.pack_size for p in self.packs) + len(manifest)
        return StoredSnapshot(self.snapshot_id, self.virtual_size, stored, sum(p.grain_count for p in self.packs),
                              sha256, len(self.packs))

    async def _passable(self, extents: AsyncIterator[Extent]) -> AsyncIterator[Extent]:
        """DEFLATED extents the store cannot keep as they are become DATA (inflated in the pool, in order)."""
        async def materialise(extent: Extent) -> Extent:
            if extent.kind is not Kind.DEFLATED or _passable(extent, self.virtual_size):
                return extent
            plain = await self.store.workers.run(codec.inflate_grains, extent.grains, extent.grain_size,
                                                 extent.length)
            return Extent.of_data(extent.offset, b"".join(plain))

        async for extent in ordered_map(materialise, extents, self.options.depth):
            yield extent

    # packs

    async def _add(self, grain: int, stream: bytes, crc: int) -> None:
        if self._sink is None:
            if len(self.packs) >= MAX_PACKS:
                raise StorageError(f"snapshot {self.snapshot_id} needs more than {MAX_PACKS} packs; "
                                   "configure a larger pack size", reason="store.too_many_packs")
            key = f"{self.snapshot_id}/{pack_name(len(self.packs))}"  # numbered as they are sealed
            self._sink = await self.store.objects.create(key, self.options.pack_size + MAX_INDEX_BYTES)
        self._entries.append((grain, self._sink.position, len(stream), crc))
        await self._sink.write(stream)
        self.progress.bytes_written += len(stream)
        if self._sink.position >= self.options.pack_size or len(self._entries) >= MAX_GRAINS_PER_PACK:
            await self._seal()

    async def _seal(self) -> None:
        """Finish the open pack with its index and commit it in the background (bounded)."""
        sink, entries = self._sink, self._entries
        if sink is None:
            return
        self._sink, self._entries = None, []
        number = len(self.packs)
        index_offset = sink.position
        index = encode_index(self.snapshot_id, number, entries)
        assert len(index) == index_size(len(entries))
        await sink.write(index)
        self.progress.bytes_written += len(index)
        self.packs.append(PackEntry(entries[0][0], entries[-1][0] + 1, len(entries), crc32c(index), index_offset,
                                    sink.position))
        await self._slots.acquire()
        task = asyncio.ensure_future(self._commit(sink))
        self._commits.add(task)
        self._raise_failed()

    async def _commit(self, sink: Sink) -> None:
        try:
            await sink.commit()
        except BaseException:
            await sink.abort()
            raise
        finally:
            self._slots.release()

    def _raise_failed(self) -> None:
        for task in [t for t in self._commits if t.done()]:
            self._commits.discard(task)
            if not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]

    async def _drain(self) -> None:
        while self._commits:
            await asyncio.wait(self._commits, return_when=asyncio.FIRST_EXCEPTION)
            self._raise_failed()

    async def abort(self) -> None:
        """Stop everything in flight and remove every object of this snapshot; never raises."""
        try:
            await cancel_and_wait(*self._commits)
            self._commits.clear()
            if self._sink is not None:
                sink, self._sink = self._sink, None
                await sink.abort()
            await self.store._remove_all(self.snapshot_id)
        except Exception as exc:  # the write's own error is what the caller must see
            log.warning("snapshot %s: cleanup after a failed write is incomplete (%s); garbage collection "
                        "will finish it", self.snapshot_id, exc)


async def _batches(extents: AsyncIterator[Extent]) -> AsyncIterator[list[Extent]]:
    """Group extents into encode jobs of about BATCH_BYTES of data (zero runs ride along for free)."""
    batch: list[Extent] = []
    size = 0
    async for extent in extents:
        batch.append(extent)
        if extent.kind is not Kind.ZERO:
            size += extent.length
        if size >= BATCH_BYTES or len(batch) >= 256:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


# --- reading a snapshot as an image ---------------------------------------------------------------

@dataclass
class _Run:
    number: int  # pack
    index: PackIndex
    first: int  # index entries first..last
    last: int


@dataclass
class _Fetched:
    run: _Run
    streams: list[bytes] = field(default_factory=list)


class StoreReader(Reader):
    """A stored snapshot as an image: ZERO and DEFLATED (64 KiB grains) extents, in offset order.

    A VMDK stream writer passes the grains through (keep_grain=65536); every other writer inflates
    them through the normal path. Memory: ``window x readahead`` plus two pack indices.
    """

    format = "vmied-store"

    def __init__(self, store: SnapshotStore, manifest: Manifest) -> None:  # no Source: the store reads
        self.store = store
        self.manifest = manifest
        self.workers = store.workers
        self.virtual_size = manifest.virtual_size
        self.bytes_read = 0

    @classmethod
    def probe(cls, head: bytes, tail: bytes, size: int) -> bool:
        return False  # never detected from content: opened by snapshot id

    @classmethod
    async def open(cls, source: Source, workers: Workers) -> Reader:
        raise UsageError("a stored snapshot is opened with SnapshotStore.open(snapshot_id)")

    async def load(self) -> None:
        return None

    def info(self) -> ImageInfo:
        manifest = self.manifest
        return ImageInfo(self.format, manifest.virtual_size, allocated_bytes=manifest.data_grains * GRAIN_SIZE,
                         cluster_size=GRAIN_SIZE,
                         details={"snapshot_id": manifest.snapshot_id, "packs": manifest.pack_count,
                                  "stored_bytes": manifest.stored_bytes, "sha256": manifest.sha256})

    async def close(self) -> None:
        return None

    async def extents(self) -> AsyncIterator[Extent]:
        runs = self._runs()
        fetches = ordered_map(self._fetch, runs, self.store.options.readahead)
        try:
            async for extent in self._extents(fetches):
                yield extent
        finally:  # a consumer that stops early: no read stays in flight
            await _aclose(fetches)
            await _aclose(runs)

    async def _extents(self, fetches: AsyncIterator[_Fetched]) -> AsyncIterator[Extent]:
        position = 0
        async for fetched in fetches:
            index, run = fetched.run.index, fetched.run
            pending: list[bytes] = []
            start = 0
            for entry, stream in zip(range(run.first, run.last + 1), fetched.streams, strict=True):
                offset = index.grains[entry] * GRAIN_SIZE
                if pending and (offset != start + len(pending) * GRAIN_SIZE or len(pending) >= EXTENT_GRAINS):
                    yield self._deflated(start, pending)
                    position, pending = start + len(pending) * GRAIN_SIZE, []
                if not pending:
                    if offset > position:
                        yield Extent.zero(position, offset - position)
                    start = offset
                pending.append(stream)
            if pending:
                yield self._deflated(start, pending)
                position = min(start + len(pending) * GRAIN_SIZE, self.virtual_size)
        if position < self.virtual_size:
            yield Extent.zero(position, self.virtual_size - position)

    def _deflated(self, start: int, streams: list[bytes]) -> Extent:
        length = min(len(streams) * GRAIN_SIZE, self.virtual_size - start)
        return Extent.deflated(start, length, tuple(streams), GRAIN_SIZE)

    async def _runs(self) -> AsyncIterator[_Run]:
        """Runs of index entries whose bytes fit a window, pack after pack; indices read two ahead."""
        async def numbers() -> AsyncIterator[int]:
            for number in range(self.manifest.pack_count):
                yield number

        async def load(number: int) -> tuple[int, PackIndex]:
            return number, await self.store.index(self.manifest, number)

        window = self.store.options.window
        indices = ordered_map(load, numbers(), 2)
        try:
            async for number, index in indices:
                first = 0
                while first < len(index):
                    last = first
                    while last + 1 < len(index) and index.offsets[last + 1] + index.lengths[last + 1] \
                            - index.offsets[first] <= window:
                        last += 1
                    yield _Run(number, index, first, last)
                    first = last + 1
        finally:
            await _aclose(indices)

    async def _fetch(self, run: _Run) -> _Fetched:
        streams = await self.store.grains(self.manifest, run.number, run.index, run.first, run.last)
        self.bytes_read += sum(len(s) for s in streams)
        return _Fetched(run, streams)
