"""The service behind the EC2 API: catalog, snapshot store, worker pool and the task engine.

``vmied serve`` does ``service = await Service.start(config)``, hands the service to the API app
(handlers reach it as ``RequestContext.service``), calls :meth:`Service.reload` on SIGHUP and
:meth:`Service.stop` on SIGTERM.

Start-up order matters for durability: the catalog is opened first; the store then drops whatever
no catalog row names (partial writes of a crashed run, snapshots of tasks that never committed);
only then are interrupted tasks resumed, so a resumed task never meets its own half-written data.
"""

from __future__ import annotations

import asyncio
import copy
import fcntl
import logging
import os
import time
from collections.abc import Iterable
from typing import IO, Any

from .. import metrics
from ..config import Config
from ..errors import UsageError, VmiedError
from ..pipeline import Workers
from .db import ACTIVE, COMPLETED, DELETED, DELETING, FINISHED_STATES, Catalog, ImageRecord, Tag, Task
from .engine import KINDS, Engine, load_kinds

log = logging.getLogger("vmied.tasks")

#: Describe calls without ids list tasks that are active or ended within this many seconds (AWS: 7 days).
RETENTION = 7 * 24 * 3600.0
TASK_STATES = (ACTIVE, DELETING, DELETED, COMPLETED)


class ServiceUnavailable(VmiedError):
    """The service is stopping and takes no new tasks."""

    reason = "service.stopping"


def lock_state(database: str) -> IO[bytes]:
    """An exclusive lock beside the database: two daemons on one state would resume the same tasks."""
    os.makedirs(os.path.dirname(os.path.abspath(database)), exist_ok=True)
    lock = open(database + ".lock", "ab")  # noqa: SIM115  (held open for the service's lifetime)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.close()
        raise UsageError(f"another vmied is running on this state ({database} is locked)",
                         reason="state.locked") from None
    return lock


class Service:
    def __init__(self, config: Config, catalog: Catalog, store: Any, workers: Workers) -> None:
        self.config = config
        self.catalog = catalog
        self.store = store
        self.workers = workers
        self.engine = Engine(self)
        self.started = time.time()
        self.lock: IO[bytes] | None = None  # held while the service runs: one daemon per state directory

    @classmethod
    async def start(cls, config: Config) -> Service:
        """Open the catalog and the store, clean up after a crash, resume interrupted tasks."""
        from ..store import open_store

        load_kinds()  # before recovery: a task whose kind is not loaded would be ended as unknown
        lock = await asyncio.to_thread(lock_state, config.state.database)
        workers = Workers(config.limits.workers or None)
        catalog: Catalog | None = None
        service: Service | None = None
        try:
            catalog = await Catalog.open(config.state.database)
            service = cls(config, catalog, await open_store(config, workers), workers)
            service.lock = lock
            await service.recover()
        except BaseException:
            if service is not None:
                await service.stop(0)
            else:
                if catalog is not None:
                    await catalog.close()
                workers.close()
                lock.close()
            raise
        return service

    async def recover(self) -> None:
        """Forget old tasks, collect what no catalog row names from the store, resume the interrupted."""
        purged = await self.catalog.purge_tasks(time.time() - 2 * RETENTION)  # Describe shows 7 days; keep 14
        if purged:
            log.info("forgot %d tasks that ended more than %d days ago", purged, 2 * RETENTION // 86400)
        unfinished = await self.catalog.list_tasks(KINDS, states=(ACTIVE, DELETING))
        await self.store.collect_garbage(await self.catalog.snapshot_ids())
        await self.engine.recover(unfinished)
        await self.count_tasks()

    async def stop(self, grace: float) -> None:
        """Take no new tasks, give running ones ``grace`` seconds, checkpoint the rest, close."""
        await self.engine.stop(grace)
        if self.engine._counting is not None:
            await asyncio.gather(self.engine._counting, return_exceptions=True)
        await self.store.close()
        await self.catalog.close()
        self.workers.close()
        if self.lock is not None:
            self.lock.close()

    async def reload(self, config: Config) -> None:
        """New limits and role settings apply to tasks started from now on (SIGHUP)."""
        self.config = config
        self.engine.schedule()

    # --- tasks ---------------------------------------------------------------------------------------

    async def submit(self, task: Task, tags: Iterable[Tag] = ()) -> tuple[Task, bool]:
        """Create and queue ``task``; with a client token seen before, the earlier task (created False).

        Raises :class:`~vmied.tasks.db.TokenMismatch` if that token came with other parameters.
        """
        if not self.engine.accepting:
            raise ServiceUnavailable("the service is shutting down; try again shortly")
        task.status_message = "pending"
        task.progress = KINDS[task.kind].pending_progress
        task.phase = "pending"
        stored, created = await self.catalog.create_task(task, tags)
        if not created:
            return self.fresh(stored), False
        answer = copy.deepcopy(stored)  # the new task as accepted (pending), whatever the runner does next
        self.engine.transition(stored)
        self.engine.enqueue(stored)
        return answer, True

    def fresh(self, task: Task) -> Task:
        return self.engine.live(task.id) or task

    async def tasks(self, kinds: tuple[str, ...], ids: list[str] | None = None,
                    states: list[str] | None = None) -> list[Task]:
        """Tasks of ``kinds`` (all of ``ids``, else those active or ended within the retention period)."""
        finished_after = None if ids else time.time() - RETENTION
        found = await self.catalog.list_tasks(kinds, states=states, ids=ids, finished_after=finished_after)
        return [self.fresh(task) for task in found]

    async def get_task(self, task_id: str) -> Task | None:
        live = self.engine.live(task_id)
        return live if live is not None else await self.catalog.get_task(task_id)

    async def cancel(self, task: Task, reason: str) -> str:
        """Cancel an active task (the caller checked its state); returns the previous state."""
        return await self.engine.cancel(self.fresh(task), reason)

    def is_finished(self, task: Task) -> bool:
        return task.state in FINISHED_STATES

    # --- catalog resources ---------------------------------------------------------------------------

    async def delete_snapshot(self, snapshot_id: str) -> list[str]:
        """Delete a snapshot unless images use it; returns those images (empty: deleted)."""
        users = await self.catalog.delete_snapshot(snapshot_id)
        if not users:
            await self.delete_stored(snapshot_id)
        return users

    async def deregister_image(self, image: ImageRecord, delete_snapshots: bool) -> list[tuple[str, str]]:
        """Remove the image; with ``delete_snapshots``, each snapshot no other image uses (id, returnCode)."""
        await self.catalog.delete_image(image.id)
        results: list[tuple[str, str]] = []
        if delete_snapshots:
            for snapshot_id in dict.fromkeys(device.snapshot_id for device in image.devices):
                if await self.catalog.get_snapshot(snapshot_id) is None:
                    results.append((snapshot_id, "client-error"))
                elif await self.delete_snapshot(snapshot_id):
                    results.append((snapshot_id, "skipped"))
                else:
                    results.append((snapshot_id, "success"))
        return results

    async def delete_stored(self, snapshot_id: str) -> None:
        """Free a snapshot's data; a failure leaves it to the next start's garbage collection."""
        try:
            await self.store.delete(snapshot_id)
        except Exception:
            log.warning("could not delete snapshot %s from the store; the next start collects it", snapshot_id,
                        exc_info=True)

    async def count_tasks(self) -> None:
        """Set the ``vmied_tasks`` gauge from the catalog (after every state change)."""
        try:
            counts = await self.catalog.count_tasks()
        except Exception:  # the catalog is closing; the gauge is refreshed at the next change
            return
        for kind in KINDS:
            for state in TASK_STATES:
                metrics.TASKS.labels(kind, state).set(counts.get((kind, state), 0))

    # --- status --------------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """Runner counts per pool and the running tasks' phases and bytes (status page, ``vmied tasks``)."""
        running = []
        for context, _ in self.engine.running.values():
            task = context.task
            running.append({"id": task.id, "kind": task.kind, "state": task.state,
                            "status_message": task.status_message, "progress": task.progress,
                            "phase": task.phase, "bytes": task.phase_bytes})
        return {"pools": self.engine.status(), "running": running, "accepting": self.engine.accepting}

    async def status_summary(self) -> dict[str, Any]:
        """Running tasks (phase, bytes, ETA) and recent failures, for the daemon's status page."""
        running = []
        for context, _ in self.engine.running.values():
            task = context.task
            counters = task.phase_bytes.get(task.phase, {})
            done, total = counters.get("position"), counters.get("virtual")
            elapsed = context.progress.elapsed
            eta = (elapsed * (total - done) / done) if done and total and done < total else None
            running.append({"task_id": task.id, "kind": task.kind, "status_message": task.status_message,
                            "progress": task.progress, "bytes_done": done, "bytes_total": total,
                            "bytes_read": counters.get("read"), "eta_seconds": eta})
        failed = [{"task_id": task.id, "kind": task.kind, "status_message": task.status_message,
                   "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(task.finished or task.updated))}
                  for task in await self.catalog.recent_failures(time.time() - RETENTION)]
        return {"running": running, "failed": failed}
