"""``vmied tasks``: list, describe and cancel a running daemon's tasks, as an operator would.

It talks to the daemon like any client: the EC2 API through boto3 with the ``vmied`` profile that
the first start wrote (its endpoint and region come from the profile; ``--endpoint-url`` and
``--region`` override them). Progress in bytes and the ETA of running tasks come from the daemon's
``/status.json`` beside the API (the EC2 answers only carry a percentage).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from .errors import UsageError, VmiedError
from .status import human_bytes, human_seconds

DEFAULT_ENDPOINT = "http://127.0.0.1:8080"
DEFAULT_REGION = "us-east-1"


class DaemonError(VmiedError):
    """The daemon could not be reached or refused the request."""

    reason = "daemon"


@dataclass(frozen=True)
class TaskApi:
    """How one kind of task is described and cancelled through the EC2 API."""

    kind: str
    prefixes: tuple[str, ...]
    describe: str  # boto3 method
    ids_parameter: str
    result_key: str
    id_key: str
    cancel: str
    cancel_parameter: str
    detail_key: str = ""  # import-snapshot tasks keep their status in SnapshotTaskDetail
    state_key: str = "Status"

    def fields(self, task: dict[str, Any]) -> dict[str, Any]:
        detail = task.get(self.detail_key, {}) if self.detail_key else task
        progress = detail.get("Progress")
        return {"task_id": task[self.id_key], "kind": self.kind, "status": detail.get(self.state_key, ""),
                "status_message": detail.get("StatusMessage", ""),
                "progress": int(str(progress)) if str(progress or "").isdigit() else None}


TASK_APIS = (
    TaskApi("import-image", ("import-ami",), "describe_import_image_tasks", "ImportTaskIds", "ImportImageTasks",
            "ImportTaskId", "cancel_import_task", "ImportTaskId"),
    TaskApi("import-snapshot", ("import-snap",), "describe_import_snapshot_tasks", "ImportTaskIds",
            "ImportSnapshotTasks", "ImportTaskId", "cancel_import_task", "ImportTaskId",
            detail_key="SnapshotTaskDetail"),
    TaskApi("export-image", ("export-ami",), "describe_export_image_tasks", "ExportImageTaskIds", "ExportImageTasks",
            "ExportImageTaskId", "cancel_export_task", "ExportTaskId"),
    TaskApi("export-instance", ("export-i",), "describe_export_tasks", "ExportTaskIds", "ExportTasks",
            "ExportTaskId", "cancel_export_task", "ExportTaskId", state_key="State"),
    TaskApi("conversion", ("import-i", "import-vol"), "describe_conversion_tasks", "ConversionTaskIds",
            "ConversionTasks", "ConversionTaskId", "cancel_conversion_task", "ConversionTaskId", state_key="State"),
)


def task_api(task_id: str) -> TaskApi:
    prefix = task_id.rsplit("-", 1)[0]
    for api in TASK_APIS:
        if prefix in api.prefixes:
            return api
    raise UsageError(f"{task_id!r} is not a task id (import-ami-..., import-snap-..., export-ami-..., export-i-..., "
                     "import-i-..., import-vol-...)")


class Daemon:
    """The daemon as seen through its EC2 endpoint and its status document."""

    def __init__(self, profile: str, endpoint_url: str | None, region: str | None) -> None:
        import boto3
        from botocore.config import Config as BotoConfig
        from botocore.exceptions import BotoCoreError

        try:
            session = boto3.session.Session(profile_name=profile)
            scoped = session._session.get_scoped_config()
        except BotoCoreError as exc:
            raise UsageError(f"profile {profile!r}: {exc}") from None
        # Never fall back to AWS's own endpoint: a profile without endpoint_url means the local daemon.
        self.endpoint = (endpoint_url or scoped.get("endpoint_url") or DEFAULT_ENDPOINT).rstrip("/")
        self.client = session.client("ec2", endpoint_url=self.endpoint,
                                     region_name=region or session.region_name or DEFAULT_REGION,
                                     config=BotoConfig(retries={"max_attempts": 2}, connect_timeout=5,
                                                       read_timeout=30))

    def call(self, method: str, **parameters: Any) -> dict[str, Any]:
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        action = "".join(word.capitalize() for word in method.split("_"))
        try:
            answer: dict[str, Any] = getattr(self.client, method)(**parameters)
            return answer
        except ClientError as exc:
            error = exc.response.get("Error", {})
            raise DaemonError(f"{action}: {error.get('Code')}: {error.get('Message')}") from None
        except NoCredentialsError:
            raise UsageError("no credentials: give --profile (the daemon writes the 'vmied' profile)") from None
        except BotoCoreError as exc:
            raise DaemonError(f"{action} at {self.endpoint}: {exc}") from None

    def pages(self, api: TaskApi, **parameters: Any) -> Iterator[dict[str, Any]]:
        if self.client.can_paginate(api.describe):
            from botocore.exceptions import BotoCoreError, ClientError

            try:
                for page in self.client.get_paginator(api.describe).paginate(**parameters):
                    yield from page.get(api.result_key, [])
            except ClientError as exc:
                error = exc.response.get("Error", {})
                raise DaemonError(f"{api.describe}: {error.get('Code')}: {error.get('Message')}") from None
            except BotoCoreError as exc:
                raise DaemonError(f"{api.describe} at {self.endpoint}: {exc}") from None
        else:
            yield from self.call(api.describe, **parameters).get(api.result_key, [])

    def running(self) -> dict[str, dict[str, Any]]:
        """Bytes and ETA of the running tasks by id (empty if the status document cannot be read)."""
        # Here, not at the top: this module builds part of every command's parser, and urllib.request
        # (with http.client and email) is 15 ms of a conversion's start-up.
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(f"{self.endpoint}/status.json", timeout=10) as answer:
                status = json.load(answer)
        except (urllib.error.URLError, OSError, ValueError):
            return {}
        return {task["task_id"]: task for task in status.get("running", []) if "task_id" in task}


def with_bytes(row: dict[str, Any], running: dict[str, dict[str, Any]]) -> dict[str, Any]:
    live = running.get(row["task_id"], {})
    return {**row, "bytes_done": live.get("bytes_done"), "bytes_total": live.get("bytes_total"),
            "eta_seconds": live.get("eta_seconds")}


def list_tasks(daemon: Daemon) -> list[dict[str, Any]]:
    rows = []
    for api in TASK_APIS:
        try:
            rows += [api.fields(task) for task in daemon.pages(api)]
        except DaemonError as exc:
            if "InvalidAction" in exc.message:  # a daemon without this kind of task
                continue
            raise
    running = daemon.running()
    return [with_bytes(row, running) for row in rows]


def describe_task(daemon: Daemon, task_id: str) -> dict[str, Any]:
    api = task_api(task_id)
    tasks = daemon.call(api.describe, **{api.ids_parameter: [task_id]}).get(api.result_key, [])
    if not tasks:
        raise DaemonError(f"no task {task_id}")
    return {**with_bytes(api.fields(tasks[0]), daemon.running()), "task": tasks[0]}


def cancel_task(daemon: Daemon, task_id: str) -> dict[str, Any]:
    api = task_api(task_id)
    answer = daemon.call(api.cancel, **{api.cancel_parameter: task_id})
    answer.pop("ResponseMetadata", None)
    return answer


def table(rows: list[dict[str, Any]]) -> str:
    header = ("TASK", "KIND", "STATUS", "MESSAGE", "PROGRESS", "BYTES", "ETA")
    lines = [header]
    for row in rows:
        done, total = row.get("bytes_done"), row.get("bytes_total")
        size = f"{human_bytes(done)}/{human_bytes(total)}" if done is not None or total is not None else "-"
        eta = human_seconds(row["eta_seconds"]) if row.get("eta_seconds") is not None else "-"
        progress = f"{row['progress']}%" if row.get("progress") is not None else "-"
        lines.append((row["task_id"], row["kind"], row["status"], row["status_message"] or "-", progress, size, eta))
    widths = [max(len(str(line[column])) for line in lines) for column in range(len(header))]
    return "\n".join("  ".join(str(value).ljust(width) for value, width in zip(line, widths, strict=True)).rstrip()
                     for line in lines)


async def run_tasks(args: argparse.Namespace) -> int:
    """The ``vmied tasks`` subcommands; boto3 blocks, so it runs in a thread."""
    return await asyncio.to_thread(tasks_command, args)


def tasks_command(args: argparse.Namespace) -> int:
    daemon = Daemon(args.profile, args.endpoint_url, args.region)
    if args.tasks_command == "list":
        rows = list_tasks(daemon)
        print(json.dumps(rows, indent=2) if args.output == "json" else table(rows))
    elif args.tasks_command == "describe":
        described = [describe_task(daemon, task_id) for task_id in args.task_ids]
        if args.output == "json":
            print(json.dumps(described, indent=2, default=str))
        else:
            print(table(described))
    else:
        answer = cancel_task(daemon, args.task_id)
        if args.output == "json":
            print(json.dumps(answer, indent=2))
        else:
            print(f"{args.task_id}: {answer.get('PreviousState', '?')} -> {answer.get('State', 'cancelling')}")
    sys.stdout.flush()
    return 0


def add_tasks_parser(commands: Any) -> None:
    tasks = commands.add_parser("tasks", help="list, describe or cancel the tasks of a running daemon")
    tasks.add_argument("--profile", default="vmied", help="AWS profile with the daemon's key (default: vmied)")
    tasks.add_argument("--endpoint-url", help=f"the daemon's URL (default: the profile's, else {DEFAULT_ENDPOINT})")
    tasks.add_argument("--region", help="region (default: the profile's)")
    tasks.add_argument("--output", choices=("table", "json"), default="table")
    actions = tasks.add_subparsers(dest="tasks_command", required=True)
    actions.add_parser("list", help="every task the daemon reports (active and of the last 7 days)")
    describe = actions.add_parser("describe", help="one or more tasks in full")
    describe.add_argument("task_ids", nargs="+", metavar="TASK_ID")
    cancel = actions.add_parser("cancel", help="cancel a task (imports, exports, conversions)")
    cancel.add_argument("task_id", metavar="TASK_ID")
    tasks.set_defaults(run=run_tasks)
