"""The catalog: tasks, images, snapshots and tags in SQLite (design §5).

SQLite runs in WAL mode with ``synchronous=FULL``: a commit is on disk when the call returns, so a
snapshot or image the catalog reports is never lost to a crash. Every call runs on one dedicated
thread (:class:`Database`), never on the event loop; the SQL lives here, behind :class:`Catalog`'s
repository methods, and nowhere else.

Schema (``PRAGMA user_version`` = :data:`SCHEMA_VERSION`)::

    tasks       id, kind, state, status_message, progress, phase, phase_bytes (JSON per phase),
                params (JSON: the request), result (JSON), checkpoint (JSON), client_token,
                access_key, account_id, restarts, created, updated, finished
    snapshots   id, description, virtual_size, stored_bytes, state, owner_id, task_id, encrypted,
                kms_key_id, sha256, created
    images      id, name, description, owner_id, state, architecture, platform, boot_mode,
                license_type, usage_operation, root_device_name, task_id, created
    image_devices  image_id, position, device_name, snapshot_id, virtual_size
    tags        resource_id, key, value, resource_type
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ..errors import StorageError

T = TypeVar("T")

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE tasks (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    state TEXT NOT NULL,
    status_message TEXT NOT NULL DEFAULT '',
    progress INTEGER,
    phase TEXT NOT NULL DEFAULT '',
    phase_bytes TEXT NOT NULL DEFAULT '{}',
    params TEXT NOT NULL DEFAULT '{}',
    result TEXT NOT NULL DEFAULT '{}',
    checkpoint TEXT NOT NULL DEFAULT '{}',
    client_token TEXT,
    access_key TEXT NOT NULL DEFAULT '',
    account_id TEXT NOT NULL DEFAULT '',
    restarts INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    finished REAL
);
CREATE UNIQUE INDEX tasks_client_token ON tasks (access_key, kind, client_token)
    WHERE client_token IS NOT NULL;
CREATE INDEX tasks_kind_state ON tasks (kind, state);
CREATE TABLE snapshots (
    id TEXT PRIMARY KEY,
    description TEXT NOT NULL DEFAULT '',
    virtual_size INTEGER NOT NULL,
    stored_bytes INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL,
    owner_id TEXT NOT NULL,
    task_id TEXT NOT NULL DEFAULT '',
    encrypted INTEGER NOT NULL DEFAULT 0,
    kms_key_id TEXT NOT NULL DEFAULT '',
    sha256 TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL
);
CREATE INDEX snapshots_task ON snapshots (task_id);
CREATE TABLE images (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    description TEXT NOT NULL DEFAULT '',
    owner_id TEXT NOT NULL,
    state TEXT NOT NULL,
    architecture TEXT NOT NULL,
    platform TEXT NOT NULL DEFAULT '',
    boot_mode TEXT NOT NULL DEFAULT '',
    license_type TEXT NOT NULL DEFAULT '',
    usage_operation TEXT NOT NULL DEFAULT '',
    root_device_name TEXT NOT NULL,
    task_id TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL
);
CREATE TABLE image_devices (
    image_id TEXT NOT NULL REFERENCES images (id) ON DELETE CASCADE,
    position INTEGER NOT NULL,
    device_name TEXT NOT NULL,
    snapshot_id TEXT NOT NULL,
    virtual_size INTEGER NOT NULL,
    PRIMARY KEY (image_id, position)
);
CREATE INDEX image_devices_snapshot ON image_devices (snapshot_id);
CREATE TABLE tags (
    resource_id TEXT NOT NULL,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    resource_type TEXT NOT NULL,
    PRIMARY KEY (resource_id, key)
);
"""

#: Task states (docs/ec2-api.md §3.2): the phase of an active task is in ``status_message``.
ACTIVE, DELETING, DELETED, COMPLETED = "active", "deleting", "deleted", "completed"
FINISHED_STATES = (DELETED, COMPLETED)


@dataclass
class Task:
    id: str
    kind: str
    state: str = ACTIVE
    status_message: str = ""
    progress: int | None = None
    phase: str = ""
    #: bytes per phase: phase -> {"read": n, "written": n, "virtual": n, "position": n, ...}
    phase_bytes: dict[str, dict[str, int]] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    result: dict[str, Any] = field(default_factory=dict)
    checkpoint: dict[str, Any] = field(default_factory=dict)
    client_token: str | None = None
    access_key: str = ""
    account_id: str = ""
    restarts: int = 0
    created: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)
    finished: float | None = None


@dataclass
class SnapshotRecord:
    id: str
    virtual_size: int
    owner_id: str
    description: str = ""
    stored_bytes: int = 0
    state: str = "completed"
    task_id: str = ""
    encrypted: bool = False
    kms_key_id: str = ""
    sha256: str = ""
    created: float = field(default_factory=time.time)


@dataclass
class BlockDevice:
    device_name: str
    snapshot_id: str
    virtual_size: int


@dataclass
class ImageRecord:
    id: str
    name: str
    owner_id: str
    architecture: str
    root_device_name: str
    devices: list[BlockDevice]
    description: str = ""
    state: str = "available"
    platform: str = ""  # "" (Linux/UNIX) or "Windows"
    boot_mode: str = ""
    license_type: str = ""
    usage_operation: str = ""
    task_id: str = ""
    created: float = field(default_factory=time.time)


@dataclass(frozen=True)
class Tag:
    resource_id: str
    resource_type: str
    key: str
    value: str


class Database:
    """One SQLite connection, used only from its own thread; ``await run(fn)`` calls ``fn(conn)`` there."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="vmied-db")
        self._conn: sqlite3.Connection | None = None

    @classmethod
    async def open(cls, path: str) -> Database:
        db = cls(path)
        await db.run_raw(db._connect)
        return db

    def _connect(self) -> None:
        if self.path != ":memory:":
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        try:
            conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute("PRAGMA busy_timeout=5000")
            migrate(conn)
        except sqlite3.Error as exc:
            raise StorageError(f"cannot open the task database {self.path}: {exc}", reason="db.open") from exc
        self._conn = conn

    async def run_raw(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn)

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn(conn)`` in one transaction on the database thread (committed when it returns)."""

        def call() -> T:
            assert self._conn is not None, "database is closed"
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                value = fn(conn)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            return value

        return await self.run_raw(call)

    async def close(self) -> None:
        def shut() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        await self.run_raw(shut)
        self._thread.shutdown(wait=True)


def migrate(conn: sqlite3.Connection) -> None:
    """Create the schema in an empty database; refuse one written by a newer vmied."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version == SCHEMA_VERSION:
        return
    if version > SCHEMA_VERSION:
        raise sqlite3.DatabaseError(f"schema version {version} is newer than this vmied ({SCHEMA_VERSION})")
    conn.execute("BEGIN IMMEDIATE")
    for statement in _statements(_SCHEMA):
        conn.execute(statement)
    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
    conn.execute("COMMIT")


def _statements(script: str) -> list[str]:
    return [statement.strip() for statement in script.split(";") if statement.strip()]


# --- rows <-> records ---------------------------------------------------------------------------------

_TASK_COLUMNS = ("id, kind, state, status_message, progress, phase, phase_bytes, params, result, checkpoint, "
                 "client_token, access_key, account_id, restarts, created, updated, finished")


def _task(row: tuple[Any, ...]) -> Task:
    return Task(row[0], row[1], row[2], row[3], row[4], row[5], json.loads(row[6]), json.loads(row[7]),
                json.loads(row[8]), json.loads(row[9]), row[10], row[11], row[12], row[13], row[14], row[15],
                row[16])


def _task_values(task: Task) -> tuple[Any, ...]:
    return (task.id, task.kind, task.state, task.status_message, task.progress, task.phase,
            json.dumps(task.phase_bytes), json.dumps(task.params), json.dumps(task.result),
            json.dumps(task.checkpoint), task.client_token, task.access_key, task.account_id, task.restarts,
            task.created, task.updated, task.finished)


_SNAPSHOT_COLUMNS = ("id, virtual_size, owner_id, description, stored_bytes, state, task_id, encrypted, kms_key_id, "
                     "sha256, created")


def _snapshot(row: tuple[Any, ...]) -> SnapshotRecord:
    return SnapshotRecord(row[0], row[1], row[2], row[3], row[4], row[5], row[6], bool(row[7]), row[8], row[9],
                          row[10])


_IMAGE_COLUMNS = ("id, name, owner_id, architecture, root_device_name, description, state, platform, boot_mode, "
                  "license_type, usage_operation, task_id, created")


def _image(conn: sqlite3.Connection, row: tuple[Any, ...]) -> ImageRecord:
    devices = [BlockDevice(*device) for device in conn.execute(
        "SELECT device_name, snapshot_id, virtual_size FROM image_devices WHERE image_id = ? ORDER BY position",
        (row[0],))]
    return ImageRecord(row[0], row[1], row[2], row[3], row[4], devices, *row[5:])


def _task_update(task: Task) -> Callable[[sqlite3.Connection], None]:
    """The UPDATE of every field of ``task`` as it is now (later changes to the object are not included)."""
    task.updated = time.time()
    values = _task_values(task)
    columns = _TASK_COLUMNS.split(", ")[1:]

    def update(conn: sqlite3.Connection) -> None:
        conn.execute(f"UPDATE tasks SET {', '.join(f'{c} = ?' for c in columns)} WHERE id = ?", (*values[1:], task.id))

    return update


def _insert_snapshot(conn: sqlite3.Connection, snapshot: SnapshotRecord) -> None:
    conn.execute(f"INSERT OR REPLACE INTO snapshots ({_SNAPSHOT_COLUMNS}) VALUES "
                 f"({_placeholders(_SNAPSHOT_COLUMNS.split(','))})",
                 (snapshot.id, snapshot.virtual_size, snapshot.owner_id, snapshot.description,
                  snapshot.stored_bytes, snapshot.state, snapshot.task_id, int(snapshot.encrypted),
                  snapshot.kms_key_id, snapshot.sha256, snapshot.created))


def _insert_image(conn: sqlite3.Connection, image: ImageRecord) -> None:
    conn.execute(f"INSERT INTO images ({_IMAGE_COLUMNS}) VALUES ({_placeholders(_IMAGE_COLUMNS.split(','))})",
                 (image.id, image.name, image.owner_id, image.architecture, image.root_device_name,
                  image.description, image.state, image.platform, image.boot_mode, image.license_type,
                  image.usage_operation, image.task_id, image.created))
    conn.executemany("INSERT INTO image_devices (image_id, position, device_name, snapshot_id, virtual_size) "
                     "VALUES (?, ?, ?, ?, ?)",
                     [(image.id, position, device.device_name, device.snapshot_id, device.virtual_size)
                      for position, device in enumerate(image.devices)])


def _upsert_tags(conn: sqlite3.Connection, tags: list[Tag]) -> None:
    conn.executemany("INSERT INTO tags (resource_id, key, value, resource_type) VALUES (?, ?, ?, ?) "
                     "ON CONFLICT (resource_id, key) DO UPDATE SET value = excluded.value",
                     [(t.resource_id, t.key, t.value, t.resource_type) for t in tags])


def _placeholders(values: Iterable[object]) -> str:
    return ",".join("?" for _ in values)


class TokenMismatch(Exception):
    """A client token was reused for a request with different parameters."""


class Catalog:
    """Repository of tasks, snapshots, images and tags; every method is one transaction."""

    def __init__(self, db: Database) -> None:
        self.db = db

    @classmethod
    async def open(cls, path: str) -> Catalog:
        return cls(await Database.open(path))

    async def close(self) -> None:
        await self.db.close()

    # --- tasks ------------------------------------------------------------------------------------------

    async def create_task(self, task: Task, tags: Iterable[Tag] = ()) -> tuple[Task, bool]:
        """Insert ``task``; with a client token already used by the same key, the earlier task instead.

        Returns ``(task, created)``. Raises :class:`TokenMismatch` when the token's earlier request
        had different parameters (``IdempotentParameterMismatch``). ``tags`` are added with the task.
        """
        tag_list = list(tags)

        def insert(conn: sqlite3.Connection) -> tuple[Task, bool]:
            if task.client_token is not None:
                row = conn.execute(f"SELECT {_TASK_COLUMNS} FROM tasks WHERE access_key = ? AND kind = ? "
                                   "AND client_token = ?", (task.access_key, task.kind, task.client_token)).fetchone()
                if row is not None:
                    earlier = _task(row)
                    if earlier.params != task.params:
                        raise TokenMismatch(earlier.id)
                    return earlier, False
            conn.execute(f"INSERT INTO tasks ({_TASK_COLUMNS}) VALUES ({_placeholders(_TASK_COLUMNS.split(','))})",
                         _task_values(task))
            _upsert_tags(conn, tag_list)
            return task, True

        return await self.db.run(insert)

    async def save_task(self, task: Task) -> None:
        """Write every field of ``task`` (state, message, progress, checkpoint, result...)."""
        update = _task_update(task)
        await self.db.run(update)

    async def commit_snapshot(self, snapshot: SnapshotRecord, task: Task) -> None:
        """Add a snapshot the store holds completely and save its task, in one transaction."""
        update = _task_update(task)

        def commit(conn: sqlite3.Connection) -> None:
            _insert_snapshot(conn, snapshot)
            update(conn)

        await self.db.run(commit)

    async def commit_image(self, image: ImageRecord, task: Task) -> None:
        """Register an image and save its task (completed), in one transaction."""
        update = _task_update(task)

        def commit(conn: sqlite3.Connection) -> None:
            _insert_image(conn, image)
            update(conn)

        await self.db.run(commit)

    async def get_task(self, task_id: str) -> Task | None:
        def get(conn: sqlite3.Connection) -> Task | None:
            row = conn.execute(f"SELECT {_TASK_COLUMNS} FROM tasks WHERE id = ?", (task_id,)).fetchone()
            return _task(row) if row else None

        return await self.db.run(get)

    async def list_tasks(self, kinds: Iterable[str], states: Iterable[str] | None = None,
                         ids: Iterable[str] | None = None, finished_after: float | None = None) -> list[Task]:
        """Tasks of ``kinds`` in id order; ``finished_after`` hides tasks that ended before it."""
        kinds, states_list, id_list = list(kinds), list(states or ()), list(ids or ())

        def select(conn: sqlite3.Connection) -> list[Task]:
            sql = f"SELECT {_TASK_COLUMNS} FROM tasks WHERE kind IN ({_placeholders(kinds)})"
            args: list[Any] = list(kinds)
            if states_list:
                sql += f" AND state IN ({_placeholders(states_list)})"
                args += states_list
            if id_list:
                sql += f" AND id IN ({_placeholders(id_list)})"
                args += id_list
            if finished_after is not None:
                sql += " AND (finished IS NULL OR finished >= ?)"
                args.append(finished_after)
            return [_task(row) for row in conn.execute(sql + " ORDER BY id", args)]

        return await self.db.run(select)

    async def purge_tasks(self, finished_before: float) -> int:
        """Forget tasks that ended before ``finished_before`` (and their tags); how many went."""

        def purge(conn: sqlite3.Connection) -> int:
            old = [row[0] for row in conn.execute("SELECT id FROM tasks WHERE finished IS NOT NULL AND finished < ?",
                                                  (finished_before,))]
            for start in range(0, len(old), 500):
                chunk = old[start:start + 500]
                conn.execute(f"DELETE FROM tags WHERE resource_id IN ({_placeholders(chunk)})", chunk)
                conn.execute(f"DELETE FROM tasks WHERE id IN ({_placeholders(chunk)})", chunk)
            return len(old)

        return await self.db.run(purge)

    async def count_tasks(self) -> dict[tuple[str, str], int]:
        def count(conn: sqlite3.Connection) -> dict[tuple[str, str], int]:
            return {(row[0], row[1]): row[2]
                    for row in conn.execute("SELECT kind, state, count(*) FROM tasks GROUP BY kind, state")}

        return await self.db.run(count)

    async def recent_failures(self, since: float, limit: int = 20) -> list[Task]:
        def select(conn: sqlite3.Connection) -> list[Task]:
            return [_task(row) for row in conn.execute(
                f"SELECT {_TASK_COLUMNS} FROM tasks WHERE state = ? AND finished >= ? ORDER BY finished DESC LIMIT ?",
                (DELETED, since, limit))]

        return await self.db.run(select)

    # --- snapshots --------------------------------------------------------------------------------------

    async def put_snapshot(self, snapshot: SnapshotRecord) -> None:
        await self.db.run(lambda conn: _insert_snapshot(conn, snapshot))

    async def get_snapshot(self, snapshot_id: str) -> SnapshotRecord | None:
        found = await self.list_snapshots([snapshot_id])
        return found[0] if found else None

    async def list_snapshots(self, ids: Iterable[str] | None = None, task_id: str | None = None
                             ) -> list[SnapshotRecord]:
        id_list = list(ids) if ids is not None else None

        def select(conn: sqlite3.Connection) -> list[SnapshotRecord]:
            sql, args = f"SELECT {_SNAPSHOT_COLUMNS} FROM snapshots WHERE 1", []
            if id_list is not None:
                sql += f" AND id IN ({_placeholders(id_list)})"
                args += id_list
            if task_id is not None:
                sql += " AND task_id = ?"
                args.append(task_id)
            return [_snapshot(row) for row in conn.execute(sql + " ORDER BY id", args)]

        return await self.db.run(select)

    async def snapshot_ids(self) -> set[str]:
        return await self.db.run(lambda conn: {row[0] for row in conn.execute("SELECT id FROM snapshots")})

    async def images_using(self, snapshot_id: str) -> list[str]:
        def select(conn: sqlite3.Connection) -> list[str]:
            return [row[0] for row in conn.execute(
                "SELECT DISTINCT image_id FROM image_devices WHERE snapshot_id = ? ORDER BY image_id", (snapshot_id,))]

        return await self.db.run(select)

    async def delete_snapshot(self, snapshot_id: str) -> list[str]:
        """Delete the row unless an image uses it; returns the images in the way (empty: deleted)."""

        def delete(conn: sqlite3.Connection) -> list[str]:
            users = [row[0] for row in conn.execute(
                "SELECT DISTINCT image_id FROM image_devices WHERE snapshot_id = ? ORDER BY image_id", (snapshot_id,))]
            if not users:
                conn.execute("DELETE FROM snapshots WHERE id = ?", (snapshot_id,))
                conn.execute("DELETE FROM tags WHERE resource_id = ?", (snapshot_id,))
            return users

        return await self.db.run(delete)

    # --- images -----------------------------------------------------------------------------------------

    async def put_image(self, image: ImageRecord) -> None:
        await self.db.run(lambda conn: _insert_image(conn, image))

    async def get_image(self, image_id: str) -> ImageRecord | None:
        found = await self.list_images([image_id])
        return found[0] if found else None

    async def list_images(self, ids: Iterable[str] | None = None) -> list[ImageRecord]:
        id_list = list(ids) if ids is not None else None

        def select(conn: sqlite3.Connection) -> list[ImageRecord]:
            sql, args = f"SELECT {_IMAGE_COLUMNS} FROM images", []
            if id_list is not None:
                sql += f" WHERE id IN ({_placeholders(id_list)})"
                args = id_list
            return [_image(conn, row) for row in conn.execute(sql + " ORDER BY id", args).fetchall()]

        return await self.db.run(select)

    async def delete_image(self, image_id: str) -> bool:
        def delete(conn: sqlite3.Connection) -> bool:
            gone = conn.execute("DELETE FROM images WHERE id = ?", (image_id,)).rowcount > 0
            conn.execute("DELETE FROM tags WHERE resource_id = ?", (image_id,))
            return gone

        return await self.db.run(delete)

    # --- tags -------------------------------------------------------------------------------------------

    async def set_tags(self, tags: Iterable[Tag], limit: int = 50) -> str | None:
        """Create or overwrite tags; refuses (returns the resource id) if one would exceed ``limit`` tags."""
        tag_list = list(tags)

        def upsert(conn: sqlite3.Connection) -> str | None:
            _upsert_tags(conn, tag_list)
            for resource_id in sorted({t.resource_id for t in tag_list}):
                count = conn.execute("SELECT count(*) FROM tags WHERE resource_id = ?", (resource_id,)).fetchone()[0]
                if count > limit:
                    raise _TooManyTags(resource_id)
            return None

        try:
            return await self.db.run(upsert)
        except _TooManyTags as exc:
            return str(exc)

    async def delete_tags(self, resource_ids: Iterable[str], keys: list[tuple[str, str | None]] | None) -> None:
        """Delete tags of the resources: ``keys`` None = all; ``(key, None)`` any value; ``(key, v)`` only value v."""
        ids = list(resource_ids)

        def delete(conn: sqlite3.Connection) -> None:
            for resource_id in ids:
                if keys is None:
                    conn.execute("DELETE FROM tags WHERE resource_id = ? AND key NOT LIKE 'aws:%'", (resource_id,))
                    continue
                for key, value in keys:
                    if value is None:
                        conn.execute("DELETE FROM tags WHERE resource_id = ? AND key = ?", (resource_id, key))
                    else:
                        conn.execute("DELETE FROM tags WHERE resource_id = ? AND key = ? AND value = ?",
                                     (resource_id, key, value))

        await self.db.run(delete)

    async def tags_of(self, resource_ids: Iterable[str]) -> dict[str, list[Tag]]:
        ids = list(resource_ids)

        def select(conn: sqlite3.Connection) -> dict[str, list[Tag]]:
            out: dict[str, list[Tag]] = {resource_id: [] for resource_id in ids}
            for start in range(0, len(ids), 500):
                chunk = ids[start:start + 500]
                for row in conn.execute("SELECT resource_id, resource_type, key, value FROM tags WHERE resource_id "
                                        f"IN ({_placeholders(chunk)}) ORDER BY resource_id, key", chunk):
                    out[row[0]].append(Tag(*row))
            return out

        return await self.db.run(select)

    async def list_tags(self) -> list[Tag]:
        def select(conn: sqlite3.Connection) -> list[Tag]:
            return [Tag(*row) for row in conn.execute(
                "SELECT resource_id, resource_type, key, value FROM tags ORDER BY resource_id, key")]

        return await self.db.run(select)


class _TooManyTags(Exception):
    pass
