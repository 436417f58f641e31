"""The systemd units: ``systemd-analyze verify`` accepts them, and the settings the operator relies on are there."""

from __future__ import annotations

import asyncio
import configparser
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from vmied import systemd
from vmied.config import load_config

ROOT = Path(__file__).resolve().parents[1]
UNITS = ROOT / "systemd"
ANALYZE = shutil.which("systemd-analyze")


def unit(name: str) -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # systemd keys are case-sensitive
    parser.read_string((UNITS / name).read_text())
    return parser


@pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze missing: Debian package systemd (tests/run.sh has it)")
def test_systemd_analyze_verify_accepts_the_units(tmp_path: Path) -> None:
    # verify checks that ExecStart's program exists: point it at this checkout's entry point.
    vmied = shutil.which("vmied") or sys.executable
    service = (UNITS / "vmied.service").read_text()
    assert "ExecStart=/usr/bin/vmied serve" in service
    (tmp_path / "vmied.service").write_text(service.replace("/usr/bin/vmied", vmied))
    shutil.copy(UNITS / "vmied.socket", tmp_path / "vmied.socket")
    assert ANALYZE is not None
    checked = subprocess.run([ANALYZE, "verify", "--man=no", str(tmp_path / "vmied.service"),
                              str(tmp_path / "vmied.socket")], capture_output=True, text=True, timeout=120)
    assert checked.returncode == 0 and not checked.stderr.strip() and not checked.stdout.strip(), \
        checked.stdout + checked.stderr


def test_service_settings() -> None:
    service = unit("vmied.service")["Service"]
    assert service["Type"] == "notify"
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert service["DynamicUser"] == "yes" and service["StateDirectory"] == "vmied"
    assert service["ProtectSystem"] == "strict" and service["NoNewPrivileges"] == "yes"
    assert service["PrivateTmp"] == "yes" and service["ProtectHome"] == "yes"
    assert service["RestrictAddressFamilies"] == "AF_INET AF_INET6 AF_UNIX"
    assert service["CapabilityBoundingSet"] == ""
    assert service["Restart"] == "on-failure"
    # systemd must not kill the daemon while it still lets tasks finish (the default grace period).
    stop_timeout = float(service["TimeoutStopSec"].rstrip("s"))
    assert stop_timeout > load_config(str(UNITS / "vmied.toml")).server.grace_period + 10
    assert float(service["WatchdogSec"].rstrip("s")) > 0


def test_example_configuration_loads_with_the_defaults(tmp_path: Path) -> None:
    """The example file documents the defaults: loading it changes nothing."""
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    example, bare = load_config(str(UNITS / "vmied.toml")), load_config(str(empty))
    sections = ("server", "log", "state", "store", "s3", "role", "limits", "credentials")
    assert [getattr(example, name) for name in sections] == [getattr(bare, name) for name in sections]


def test_socket_unit_matches_the_default_listen_address() -> None:
    socket_unit = unit("vmied.socket")["Socket"]
    assert socket_unit["ListenStream"] in load_config(str(UNITS / "vmied.toml")).server.listen


async def test_a_long_start_asks_systemd_for_more_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """While a start runs, EXTEND_TIMEOUT_USEC comes every interval with the status; a quick start sends
    nothing, and a start that fails fails as it would without the extension."""
    with tempfile.TemporaryDirectory(dir="/tmp") as short, \
            socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        address = os.path.join(short, "notify")
        receiver.bind(address)
        receiver.setblocking(False)
        monkeypatch.setenv("NOTIFY_SOCKET", address)

        async def start(seconds: float) -> str:
            await asyncio.sleep(seconds)
            return "started"

        def received() -> list[str]:
            messages = []
            while True:
                try:
                    messages.append(receiver.recv(4096).decode())
                except BlockingIOError:
                    return messages

        assert await systemd.extending_start(start(0.35), "starting: test", every=0.1, extension=30) == "started"
        messages = received()
        assert 2 <= len(messages) <= 4
        assert all(message == "EXTEND_TIMEOUT_USEC=30000000\nSTATUS=starting: test" for message in messages)
        assert await systemd.extending_start(start(0), "starting: test", every=0.1) == "started"
        assert received() == []

        async def refused() -> None:
            await asyncio.sleep(0.15)
            raise ValueError("the store cannot be opened")

        with pytest.raises(ValueError, match="cannot be opened"):
            await systemd.extending_start(refused(), "starting: test", every=0.1)
        assert len(received()) == 1
