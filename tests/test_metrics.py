"""``/metrics``: Prometheus naming conventions checked by promtool, bounded labels, every object exposed."""
# ruff: noqa: F811  (the S3 server fixtures are imported from tests.s3server)

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from botocore.exceptions import ClientError
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import MiB
from tests.s3server import BUCKET, S3Server, aws_files, fast_retries, moto, moto_server  # noqa: F401  (fixtures)
from tests.test_daemon import Daemon, get
from vmied import metrics
from vmied.errors import StorageError
from vmied.io.open import create_sink, open_source
from vmied.io.retry import Retrier, Transient
from vmied.io.s3 import operation_label

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool missing: Debian package prometheus "
                                    "(tests/run.sh installs it)")
#: Label names a metric may have: small fixed sets. A task id, bucket, key or access key never is one.
ALLOWED_LABELS = {"action", "code", "kind", "state", "phase", "format", "direction", "operation", "outcome",
                  "reason", "version", "implementation", "major", "minor", "patchlevel", "generation"}
#: The other parts' metric objects: ``vmied.metrics`` is their contract (docs: daemon plan).
CONTRACT = ("API_REQUESTS", "API_LATENCY", "TASKS", "TASK_TRANSITIONS", "TASK_DURATION", "PHASE_DURATION",
            "BYTES", "S3_REQUESTS", "S3_RETRIES", "BUFFERED_BYTES", "PARTS_IN_FLIGHT", "STORE_BYTES",
            "STORE_GRAINS")


def promtool_check(text: bytes) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, "check", "metrics"], input=text.decode(), capture_output=True, text=True,
                          timeout=60)


def exercise_every_metric() -> None:
    """One sample of each labelled family, so that every family shows its series and types."""
    metrics.API_REQUESTS.labels("DescribeImages", "OK").inc()
    metrics.API_LATENCY.labels("DescribeImages").observe(0.004)
    metrics.TASKS.labels("import-image", "active").set(1)
    metrics.TASK_TRANSITIONS.labels("import-image", "completed").inc()
    metrics.TASK_DURATION.labels("import-image").observe(42.0)
    metrics.PHASE_DURATION.labels("import-image", "converting").observe(30.0)
    metrics.TASK_ERRORS.labels("import-snapshot", "image.corrupt").inc()
    metrics.BYTES.labels("vmdk", "read").inc(1 << 20)
    metrics.S3_REQUESTS.labels("UploadPart", "ok").inc()
    metrics.S3_RETRIES.labels("status-503").inc()
    metrics.CONFIG_RELOADS.labels("ok").inc()


@needs_promtool
def test_exposition_of_every_metric_passes_promtool() -> None:
    exercise_every_metric()
    checked = promtool_check(metrics.exposition())
    assert checked.returncode == 0 and not checked.stdout.strip() and not checked.stderr.strip(), \
        checked.stdout + checked.stderr


def test_names_units_and_labels_follow_the_conventions() -> None:
    exercise_every_metric()
    families = list(text_string_to_metric_families(metrics.exposition().decode()))
    for family in families:
        assert family.name.startswith(("vmied_", "process_", "python_")), family.name
        if family.type == "counter":
            assert any(sample.name == family.name + "_total" for sample in family.samples) or not family.samples
        if "duration" in family.name:
            assert family.name.endswith("_seconds"), family.name
        for sample in family.samples:
            assert set(sample.labels) - {"le", "quantile"} <= ALLOWED_LABELS, (sample.name, sample.labels)
    names = {family.name for family in families}
    for attribute in CONTRACT:
        assert getattr(metrics, attribute)._name in names, attribute


def test_bounded_folds_unknown_values() -> None:
    assert metrics.bounded("import-image", metrics.TASK_KINDS) == "import-image"
    assert metrics.bounded("import-ami-0123456789abcdef0", metrics.TASK_KINDS) == metrics.OTHER


@needs_promtool
def test_daemon_metrics_endpoint_passes_promtool(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path)
    daemon.start()
    try:
        client = daemon.ec2()
        client.describe_import_image_tasks()
        with pytest.raises(ClientError) as refused:
            client.describe_import_image_tasks(ImportTaskIds=["import-ami-nope"])
        code = refused.value.response["Error"]["Code"]
        status, body = get(daemon.url + "/metrics")
        assert status == 200
        checked = promtool_check(body)
        assert checked.returncode == 0 and not checked.stdout.strip() and not checked.stderr.strip(), \
            checked.stdout + checked.stderr
        text = body.decode()
        assert 'vmied_api_requests_total{action="DescribeImportImageTasks",code="OK"} 1.0' in text
        assert f'vmied_api_requests_total{{action="DescribeImportImageTasks",code="{code}"}} 1.0' in text
        assert 'vmied_api_request_duration_seconds_count{action="DescribeImportImageTasks"} 2.0' in text
        assert "import-ami-nope" not in text  # an id is never a label value
        assert daemon.stop()[0] == 0
    finally:
        daemon.kill()


DASHBOARD = Path(__file__).resolve().parents[1] / "systemd" / "grafana-dashboard.json"


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    assert queries
    return queries


def as_promql(query: str) -> str:
    """A dashboard query with Grafana's variables replaced as Grafana would before sending it."""
    return (query.replace("$__rate_interval", "5m").replace("$__range", "6h")
            .replace('"$instance"', '"127.0.0.1:8080"'))


def test_dashboard_reads_only_metrics_that_exist() -> None:
    exercise_every_metric()
    exposed = {sample.name for family in text_string_to_metric_families(metrics.exposition().decode())
               for sample in family.samples}
    for query in dashboard_queries():
        for name in re.findall(r"\b((?:vmied|process)_[a-z_]+)\b", query):
            assert name in exposed, (name, query)


@needs_promtool
def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"vmied:dashboard_query_{index}", "expr": as_promql(query)}
        for index, query in enumerate(dashboard_queries())]}]}
    path = tmp_path / "rules.yml"
    path.write_text(json.dumps(rules))  # JSON is YAML
    assert PROMTOOL is not None
    checked = subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def sample_value(name: str, **labels: str) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


async def test_s3_uploads_are_counted_by_operation_and_parts_leave_the_gauges(moto: S3Server) -> None:
    before = {operation: sample_value("vmied_s3_requests_total", operation=operation, outcome="ok")
              for operation in ("CreateMultipartUpload", "UploadPart", "CompleteMultipartUpload")}
    sink = await create_sink(f"s3://{BUCKET}/metrics/parts.raw", moto.config(part_size=5 * MiB))
    try:
        await sink.write(bytes(range(256)) * (11 * MiB // 256))  # three parts: 5 + 5 + 1 MiB
        await sink.commit()
    except BaseException:
        await sink.abort()
        raise
    counted = {operation: sample_value("vmied_s3_requests_total", operation=operation, outcome="ok") - value
               for operation, value in before.items()}
    assert counted == {"CreateMultipartUpload": 1, "UploadPart": 3, "CompleteMultipartUpload": 1}
    assert sample_value("vmied_s3_parts_in_flight") == 0 and sample_value("vmied_buffered_bytes") == 0


async def test_a_missing_object_counts_as_failed_and_retries_by_reason(moto: S3Server) -> None:
    failed = sample_value("vmied_s3_requests_total", operation="HeadObject", outcome="failed")
    with pytest.raises(StorageError):
        await open_source(f"s3://{BUCKET}/metrics/absent.raw", moto.config())
    assert sample_value("vmied_s3_requests_total", operation="HeadObject", outcome="failed") == failed + 1

    retried = sample_value("vmied_s3_retries_total", reason="status-503")
    attempts = iter([Transient("status-503", "slow down"), None])

    async def attempt() -> str:
        problem = next(attempts)
        if problem is not None:
            raise problem
        return "done"

    assert await Retrier(fast_retries()).run(attempt, "test") == "done"
    assert sample_value("vmied_s3_retries_total", reason="status-503") == retried + 1


def test_operation_labels_are_the_api_operation() -> None:
    assert operation_label("s3:PutObject (UploadPart)") == "UploadPart"
    assert operation_label("s3:GetObject (HeadObject)") == "HeadObject"
    assert operation_label("s3:GetObject") == "GetObject"
