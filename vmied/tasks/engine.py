"""Running tasks: bounded runners per pool, phases and progress, cooperative cancel, restart recovery.

A task kind (import-image, import-snapshot; export kinds register the same way) is a
:class:`TaskKind`: the coroutine that does the work given a :class:`TaskContext`, the pool whose
configured limit bounds how many run at once, and the cleanup that removes what a failed or
cancelled task partly made. The engine owns the task's state:

* ``active`` while queued or running; the phase is in ``status_message`` and ``progress`` is a
  percentage string without ``%`` (docs/ec2-api.md §3.2); bytes per phase beside it;
* ``completed`` when the kind's ``run`` returns (it commits its results through the context);
* ``deleting`` -> ``deleted`` on cancel (message: the cancel reason) or failure
  (``ClientError: ...``), after the kind's cleanup ran.

Cancellation is cooperative: :meth:`Engine.cancel` sets the task's :class:`~vmied.pipeline.Progress`
flag, and the pipeline raises :class:`~vmied.errors.Cancelled` at its next batch boundary. When the
service stops, running tasks get the grace period to finish and are then interrupted; they stay
``active`` with their checkpoint and resume at the next start (:meth:`Engine.recover`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from .. import metrics
from ..errors import Cancelled, VmiedError
from ..pipeline import Progress, await_ticking, cancel_and_wait
from .db import ACTIVE, COMPLETED, DELETED, DELETING, Catalog, Task

if TYPE_CHECKING:
    from .service import Service

log = logging.getLogger("vmied.tasks")

#: A task interrupted by this many restarts in a row is not resumed again (it ends ``deleted``).
MAX_RESTARTS = 3
#: Least time between two progress writes of one task to the database.
PROGRESS_INTERVAL = 1.0
#: Seconds between two looks at the cancel flag while a task waits for its conversion.
CANCEL_POLL = 0.1

T = TypeVar("T")


class NotCancellable(Exception):
    """The task ended before the cancel reached it; ``state`` is how it ended."""

    def __init__(self, state: str) -> None:
        super().__init__(state)
        self.state = state


class TaskFailed(Exception):
    """A task cannot go on; ``message`` is the whole statusMessage (``ClientError: ...``)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True)
class TaskKind:
    name: str  # the Task.kind value, e.g. "import-image"
    pool: str  # runners are bounded per pool: "import" or "export"
    run: Callable[[TaskContext], Awaitable[None]]
    cleanup: Callable[[TaskContext], Awaitable[None]]
    #: statusMessage/progress of a task waiting for a runner (and of a new task)
    pending_progress: int = 2


KINDS: dict[str, TaskKind] = {}


def register_kind(kind: TaskKind) -> TaskKind:
    KINDS[kind.name] = kind
    return kind


def load_kinds() -> list[str]:
    """Import the modules of this package that register task kinds: ``imports`` and every ``export_*``."""
    import importlib
    import pkgutil

    from . import __path__ as package_path

    names = sorted(info.name for info in pkgutil.iter_modules(package_path)
                   if info.name == "imports" or info.name.startswith("export_"))
    for name in names:
        importlib.import_module(f"{__package__}.{name}")
    return names


def pool_limit(service: Service, pool: str) -> int:
    limits = service.config.limits
    return {"import": limits.import_tasks, "export": limits.export_tasks}.get(pool, 1)


@dataclass
class TaskContext:
    """What a running task sees: its record, the service, its progress and cancel flag."""

    service: Service
    task: Task
    progress: Progress = field(default_factory=Progress)
    #: snapshot ids this run wrote to the store (cleanup deletes them on failure or cancel)
    written: list[str] = field(default_factory=list)
    _last_write: float = 0.0
    _phase_started: float = field(default_factory=time.monotonic)
    _saving: asyncio.Task[None] | None = None

    @property
    def catalog(self) -> Catalog:
        return self.service.catalog

    def check(self) -> None:
        """Raise Cancelled if the task was cancelled (call between steps)."""
        self.progress.check()

    async def until_cancelled(self, work: Coroutine[Any, Any, T]) -> T:
        """Run ``work``; a cancel stops it even while it waits for storage (a read or a part upload
        stalled by the server, up to its read timeout and retries).

        The pipeline checks the cancel flag between extents only, and a reader waiting for a
        response or a writer waiting for a free upload slot takes no extent: the flag is therefore
        also watched here.
        """
        return await await_ticking(work, CANCEL_POLL, self.check)

    async def phase(self, message: str, percent: int | None, name: str | None = None) -> None:
        """Enter a phase: statusMessage ``message``, progress ``percent``; written to the database."""
        self.check()
        self.end_phase()
        self.task.status_message = message
        self.task.progress = percent
        self.task.phase = name or message
        self.task.phase_bytes.setdefault(self.task.phase, {})
        await self.save()

    def end_phase(self) -> None:
        """Observe how long the current phase took (vmied_task_phase_duration_seconds)."""
        now = time.monotonic()
        if self.task.phase:
            metrics.PHASE_DURATION.labels(self.task.kind, self.task.phase).observe(now - self._phase_started)
        self._phase_started = now

    def report(self, percent: int, **counters: int) -> None:
        """Progress within the current phase (bytes read/written, position); written at most once a second."""
        self.task.progress = max(self.task.progress or 0, percent)
        self.task.phase_bytes.setdefault(self.task.phase, {}).update(counters)
        now = time.monotonic()
        if now - self._last_write >= PROGRESS_INTERVAL and (self._saving is None or self._saving.done()):
            self._last_write = now
            self._saving = asyncio.ensure_future(self._save_quietly())

    async def _save_quietly(self) -> None:
        if self.task.state == ACTIVE:
            try:
                await self.catalog.save_task(self.task)
            except Exception:  # progress only: the next phase change or checkpoint writes it again
                log.debug("progress of task %s not saved", self.task.id, exc_info=True)

    async def save(self) -> None:
        self._last_write = time.monotonic()
        await self.catalog.save_task(self.task)

    def complete(self) -> None:
        """Mark the task completed (the caller commits it with its results in one transaction)."""
        self.check()
        self.end_phase()
        self.task.state = COMPLETED
        self.task.status_message = ""
        self.task.progress = None
        self.task.phase = COMPLETED
        self.task.finished = time.time()


class Engine:
    """Queues per pool; starts runners while the pool's limit allows."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.queues: dict[str, deque[Task]] = {}
        self.running: dict[str, tuple[TaskContext, asyncio.Task[None]]] = {}
        self.accepting = True
        self._counting: asyncio.Future[None] | None = None

    # --- submission and scheduling ---------------------------------------------------------------------

    def enqueue(self, task: Task) -> None:
        kind = KINDS[task.kind]
        self.queues.setdefault(kind.pool, deque()).append(task)
        self.schedule()

    def running_in(self, pool: str) -> int:
        return sum(1 for context, _ in self.running.values() if KINDS[context.task.kind].pool == pool)

    def schedule(self) -> None:
        if not self.accepting:
            return
        for pool, queue in self.queues.items():
            while queue and self.running_in(pool) < pool_limit(self.service, pool):
                task = queue.popleft()
                context = TaskContext(self.service, task)
                runner = asyncio.ensure_future(self._run(context))
                self.running[task.id] = (context, runner)

    def live(self, task_id: str) -> Task | None:
        """The in-memory record of a queued or running task (fresher than the database's)."""
        if task_id in self.running:
            return self.running[task_id][0].task
        for queue in self.queues.values():
            for task in queue:
                if task.id == task_id:
                    return task
        return None

    # --- running ---------------------------------------------------------------------------------------

    async def _run(self, context: TaskContext) -> None:
        task = context.task
        kind = KINDS[task.kind]
        started = time.monotonic()
        try:
            await kind.run(context)
            log.info("task %s completed in %.1f s", task.id, time.monotonic() - started)
            self.transition(task)
        except asyncio.CancelledError:
            # The service is stopping: the task stays active with its checkpoint and resumes at start.
            log.info("task %s interrupted by shutdown (resumes at the next start)", task.id)
            raise
        except Cancelled:
            await self._end_deleted(context, task.status_message or "User cancelled")
        except TaskFailed as exc:
            metrics.TASK_ERRORS.labels(task.kind, "task.failed").inc()
            await self._end_deleted(context, exc.message)
        except VmiedError as exc:
            metrics.TASK_ERRORS.labels(task.kind, exc.reason).inc()
            await self._end_deleted(context, f"ClientError: {exc.message}")
        except Exception as exc:  # a bug: the task fails with a message; the log has the traceback
            log.exception("task %s failed unexpectedly", task.id)
            metrics.TASK_ERRORS.labels(task.kind, "internal").inc()
            await self._end_deleted(context, f"ServerError: internal error ({type(exc).__name__}: {exc})")
        finally:
            self.running.pop(task.id, None)
            self.schedule()

    async def _end_deleted(self, context: TaskContext, message: str) -> None:
        task = context.task
        log.info("task %s ends deleted: %s", task.id, message)
        if task.state != DELETING:
            task.state = DELETING
            self.transition(task)
        task.status_message, task.progress = message, None
        context.end_phase()
        await context.save()
        try:
            await KINDS[task.kind].cleanup(context)
        except Exception:
            log.exception("cleanup of task %s failed; its leftovers go at the next garbage collection", task.id)
        task.state, task.finished = DELETED, time.time()
        await context.save()
        self.transition(task)

    def transition(self, task: Task) -> None:
        """Count a state change (metrics), log it (one line each) and refresh the per-state gauge."""
        metrics.TASK_TRANSITIONS.labels(task.kind, task.state).inc()
        log.info("task %s is %s", task.id, task.state, extra={
            "task_id": task.id, "kind": task.kind, "state": task.state, "phase": task.phase,
            "status_message": task.status_message, "bytes": task.phase_bytes,
            "duration": round((task.finished or time.time()) - task.created, 3)})
        if task.finished is not None:
            metrics.TASK_DURATION.labels(task.kind).observe(max(0.0, task.finished - task.created))
        self._counting = asyncio.ensure_future(self.service.count_tasks())

    # --- cancel ----------------------------------------------------------------------------------------

    async def cancel(self, task: Task, reason: str) -> str:
        """Cancel an active task; returns its previous state. The caller checked it is active."""
        previous = task.state
        message = reason or "User cancelled"
        if task.id in self.running:
            context = self.running[task.id][0]
            context.task.state, context.task.status_message = DELETING, message
            context.progress.cancel()
            self.transition(context.task)
            await context.save()
            return previous
        queued = [(queue, item) for queue in self.queues.values() for item in queue if item.id == task.id]
        if not queued:  # neither running nor queued: it ended meanwhile, or this is a stale copy
            stored = await self.service.catalog.get_task(task.id)
            state = stored.state if stored is not None else DELETED
            if state != ACTIVE or task.id in self.running:
                raise NotCancellable(state)
        for queue, item in queued:
            queue.remove(item)
        await self._end_deleted(TaskContext(self.service, task), message)
        return previous

    # --- start and stop --------------------------------------------------------------------------------

    async def recover(self, tasks: list[Task]) -> None:
        """Tasks a previous run left active or deleting: resume them, or end them with the reason."""
        for task in tasks:
            if task.kind not in KINDS:
                await self._end_deleted(TaskContext(self.service, task),
                                        f"ServerError: this vmied cannot run {task.kind} tasks")
            elif task.state == DELETING:
                await self._end_deleted(TaskContext(self.service, task), task.status_message or "User cancelled")
            elif task.phase in ("", "pending"):  # queued, never started: nothing was interrupted
                self.enqueue(task)
            elif task.restarts + 1 >= MAX_RESTARTS:
                await self._end_deleted(TaskContext(self.service, task),
                                        f"ServerError: the task was interrupted by {task.restarts + 1} restarts "
                                        "of the service; it is not resumed again")
            else:
                task.restarts += 1
                log.info("task %s was interrupted by a restart; resuming (restart %d)", task.id, task.restarts)
                await self.service.catalog.save_task(task)
                self.enqueue(task)

    async def stop(self, grace: float) -> None:
        """Take no new runners; give running tasks ``grace`` seconds, then interrupt them."""
        self.accepting = False
        contexts = [context for context, _ in self.running.values()]
        runners = [runner for _, runner in self.running.values()]
        if runners:
            _, still = await asyncio.wait(runners, timeout=max(grace, 0.0))
            await cancel_and_wait(*still)
        # Progress of interrupted tasks, so a status page after the restart shows where they were.
        for context in contexts:
            if context._saving is not None:
                await asyncio.gather(context._saving, return_exceptions=True)
            if context.task.state == ACTIVE:
                with contextlib.suppress(Exception):
                    await context.save()

    def status(self) -> dict[str, Any]:
        """Counts for the status page: running and queued per pool."""
        pools = set(self.queues) | {KINDS[c.task.kind].pool for c, _ in self.running.values()}
        return {pool: {"running": self.running_in(pool), "queued": len(self.queues.get(pool, ())),
                       "limit": pool_limit(self.service, pool)} for pool in sorted(pools)}
