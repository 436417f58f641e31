"""The daemon's Prometheus metrics: one registry, the objects the other parts record into.

Naming follows the Prometheus conventions: a ``vmied_`` prefix, base units in the name
(``_bytes``, ``_seconds``), ``_total`` on counters (prometheus-client adds it). Label values come
from small fixed sets only: an action name of the EC2 model, a task kind and state, a phase, an
image format, an S3 operation, an error reason. Never a task id, bucket, key or access key: each new
value is a new time series kept forever. :func:`bounded` folds an unexpected value into ``"other"``.

Throughput is ``rate(vmied_bytes_total[1m])``; errors are ``vmied_task_errors_total`` and the
``code`` label of ``vmied_api_requests_total``.
"""

from __future__ import annotations

from collections.abc import Collection

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client import (
    exposition as _exposition,
)
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from . import __version__

# The *_created series double the exposition and no dashboard reads them.
disable_created_metrics()  # type: ignore[no-untyped-call]

#: vmied's own registry (not the library's global one), so only these series are exposed.
REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)
GCCollector(registry=REGISTRY)

CONTENT_TYPE = _exposition.CONTENT_TYPE_LATEST

TASK_KINDS = ("import-image", "import-snapshot", "export-image", "export-instance", "conversion")
TASK_STATES = ("active", "deleting", "deleted", "completed", "cancelling", "cancelled")
DIRECTIONS = ("read", "written")
OTHER = "other"

# API latency: most calls answer in milliseconds; SigV4 checks and a DB commit bound the tail.
_API_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Tasks run from seconds (a small snapshot) to hours (a multi-TiB disk).
_TASK_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0, 7200.0,
                 14400.0, 28800.0, 86400.0)

BUILD_INFO = Info("vmied_build", "The running vmied's version.", registry=REGISTRY)
BUILD_INFO.info({"version": __version__})

API_REQUESTS = Counter(
    "vmied_api_requests", "EC2 API requests answered, by action and response code "
    "(an EC2 error code such as InvalidParameterValue, or 'OK').",
    ["action", "code"], registry=REGISTRY)
API_LATENCY = Histogram(
    "vmied_api_request_duration_seconds", "Time to answer an EC2 API request, by action.",
    ["action"], buckets=_API_BUCKETS, registry=REGISTRY)

TASKS = Gauge(
    "vmied_tasks", "Tasks known to the service, by kind and state (AWS task status).",
    ["kind", "state"], registry=REGISTRY)
TASK_TRANSITIONS = Counter(
    "vmied_task_transitions", "Task state changes, by kind and the state entered.",
    ["kind", "state"], registry=REGISTRY)
TASK_DURATION = Histogram(
    "vmied_task_duration_seconds", "Time from the API call to the task's end, by kind.",
    ["kind"], buckets=_TASK_BUCKETS, registry=REGISTRY)
PHASE_DURATION = Histogram(
    "vmied_task_phase_duration_seconds", "Time spent in one phase of a task (validating, converting, ...).",
    ["kind", "phase"], buckets=_TASK_BUCKETS, registry=REGISTRY)
TASK_ERRORS = Counter(
    "vmied_task_errors", "Tasks that failed, by kind and the error's reason (vmied.errors reason).",
    ["kind", "reason"], registry=REGISTRY)

BYTES = Counter(
    "vmied_bytes", "Disk image bytes converted, by image format and direction (read or written).",
    ["format", "direction"], registry=REGISTRY)

S3_REQUESTS = Counter(
    "vmied_s3_requests", "S3 request attempts, by operation (GetObject, UploadPart, ...) and outcome "
    "(ok; transient: to be retried; failed: not retryable).", ["operation", "outcome"], registry=REGISTRY)
S3_RETRIES = Counter(
    "vmied_s3_retries", "S3 and HTTPS requests retried, by the reason (status-503, reset, timeout, ...).",
    ["reason"], registry=REGISTRY)

BUFFERED_BYTES = Gauge(
    "vmied_buffered_bytes", "Bytes held in multipart upload parts being sent.", registry=REGISTRY)
PARTS_IN_FLIGHT = Gauge(
    "vmied_s3_parts_in_flight", "Multipart upload parts being uploaded now.", registry=REGISTRY)

STORE_BYTES = Gauge(
    "vmied_store_bytes", "Bytes the snapshot store holds (deflated grains and manifests).", registry=REGISTRY)
STORE_GRAINS = Gauge(
    "vmied_store_grains", "Data grains (64 KiB of disk each) the snapshot store holds.", registry=REGISTRY)

READY = Gauge("vmied_ready", "1 while the daemon accepts work (as /readyz), else 0.", registry=REGISTRY)
CONFIG_RELOADS = Counter(
    "vmied_config_reloads", "Configuration reloads (SIGHUP), by outcome (ok or failed).",
    ["outcome"], registry=REGISTRY)


def bounded(value: str, allowed: Collection[str]) -> str:
    """``value`` if it is one of ``allowed``, else ``"other"``: keeps a label's value set bounded."""
    return value if value in allowed else OTHER


def exposition() -> bytes:
    """The registry in the Prometheus text format (``/metrics``)."""
    return generate_latest(REGISTRY)
