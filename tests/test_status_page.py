"""The status page at ``/`` as a browser shows it: headless Chromium renders it and takes a screenshot.

The daemon runs one import held mid-way (a progress bar) and one that failed on a corrupt disk (a
recent failure with its message). Chromium dumps the DOM it built and saves a PNG next to the
test's files (kept as ``status-page.png`` for a person to look at).
"""

from __future__ import annotations

import html
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.daemon import HeldServer, corrupt_vmdk, make_raw, make_vmdk
from tests.helpers import MiB
from tests.test_daemon import Daemon, get

CHROMIUM = next((path for name in ("chromium", "chromium-browser", "google-chrome")
                 if (path := shutil.which(name))), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no headless browser: Debian package chromium "
                                "(tests/run.sh installs it)")


def chromium(*args: str) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                           "--hide-scrollbars", "--window-size=1280,900", *args],
                          capture_output=True, text=True, timeout=120)


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    running = Daemon(tmp_path)
    running.start()
    yield running
    running.kill()


def wait_until(condition: Callable[[], bool], what: str, daemon: Daemon, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} not within {timeout} s:\n{daemon.log_text()}"
        time.sleep(0.1)


def test_status_page_in_headless_chromium(daemon: Daemon, tmp_path: Path) -> None:
    vmdk = make_vmdk(make_raw(tmp_path / "disk.raw", 4 * MiB, 9), tmp_path / "disk.vmdk")
    broken = corrupt_vmdk(vmdk, tmp_path / "broken.vmdk")
    held = HeldServer(vmdk, hold_above=64 * 1024)
    failing = HeldServer(broken)
    failing.release()
    ec2 = daemon.ec2()
    try:
        running_id = ec2.import_snapshot(DiskContainer={"Format": "VMDK", "Url": held.url})["ImportTaskId"]
        failed_id = ec2.import_snapshot(DiskContainer={"Format": "VMDK", "Url": failing.url})["ImportTaskId"]

        def failed() -> bool:
            detail = ec2.describe_import_snapshot_tasks(ImportTaskIds=[failed_id])["ImportSnapshotTasks"][0]
            return bool(detail["SnapshotTaskDetail"]["Status"] == "deleted")

        wait_until(lambda: held.held > 0, "the held import reading", daemon)
        wait_until(failed, "the corrupt import failing", daemon)
        message = ec2.describe_import_snapshot_tasks(
            ImportTaskIds=[failed_id])["ImportSnapshotTasks"][0]["SnapshotTaskDetail"]["StatusMessage"]
        assert message.startswith("ClientError: ")

        dom = chromium("--dump-dom", daemon.url + "/")
        assert dom.returncode == 0, dom.stderr
        page = dom.stdout
        assert "<title>vmied status</title>" in page and "ready" in page
        running = page[page.index('id="running"'):]
        assert running_id in running and "<progress" in running
        failures = page[page.index('id="failures"'):]
        assert failed_id in failures and html.escape(message, quote=False) in failures
        assert 'id="counts"' in page

        screenshot = tmp_path / "status-page.png"
        shot = chromium(f"--screenshot={screenshot}", daemon.url + "/")
        assert shot.returncode == 0, shot.stderr
        assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and screenshot.stat().st_size > 10_000
    finally:
        held.close()
        failing.close()
    assert get(daemon.url + "/readyz")[0] == 200
    assert daemon.stop()[0] == 0
