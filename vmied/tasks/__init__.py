"""Tasks and the catalog: the import (and export) engine behind the EC2 API (design §5).

How the parts fit (what a new task kind builds on):

* :mod:`.db` — the catalog in SQLite (WAL, ``synchronous=FULL``, one thread). Records: ``Task``
  (``id, kind, state, status_message, progress, phase, phase_bytes, params, result, checkpoint,
  client_token, access_key, account_id, restarts, created, updated, finished``), ``SnapshotRecord``,
  ``ImageRecord`` (+ ``BlockDevice``), ``Tag``. ``Catalog`` methods are each one transaction:
  ``create_task(task, tags)`` (ClientToken idempotency: returns ``(task, created)``, raises
  ``TokenMismatch``), ``save_task``, ``get_task``, ``list_tasks(kinds, states, ids, finished_after)``,
  ``commit_snapshot(snapshot, task)`` / ``commit_image(image, task)`` (result row and task together),
  ``get/list/delete_snapshot``, ``images_using``, ``get/list/delete_image``, ``set_tags``,
  ``delete_tags``, ``tags_of``, ``list_tags``.
* :mod:`.engine` — ``register_kind(TaskKind(name, pool, run, cleanup, pending_progress))``: ``run``
  does the work through a ``TaskContext`` (``phase(message, percent)``, ``report(percent, **bytes)``,
  ``check()`` between steps, ``progress`` = the cancel flag to hand to the pipeline, ``complete()``
  right before the final commit, ``written`` for cleanup); raise ``TaskFailed("ClientError: ...")``
  or any ``VmiedError`` to end the task ``deleted``. Pools ``import`` and ``export`` are bounded by
  ``config.limits.import_tasks`` / ``export_tasks``. Modules named ``imports`` and ``export_*`` in
  this package are loaded before recovery.
* :mod:`.service` — ``Service.start(config)`` / ``stop(grace)`` / ``reload(config)``; for handlers:
  ``submit(task, tags)``, ``tasks(kinds, ids, states)``, ``get_task``, ``fresh``, ``cancel(task,
  reason)`` (raises ``engine.NotCancellable``), ``delete_snapshot``, ``deregister_image``,
  ``delete_stored``; ``catalog``, ``store`` (the snapshot store), ``workers``, ``config``;
  ``status_summary()`` for the status page.
* :mod:`.imports` — ImportImage and ImportSnapshot; :mod:`.ids` — identifiers (§3.1).
"""
