"""The systemd protocols vmied speaks, without a library: sd_notify and socket activation.

sd_notify: one datagram of ``KEY=VALUE`` lines to the AF_UNIX socket named by ``$NOTIFY_SOCKET``
(a leading ``@`` means Linux's abstract namespace). ``READY=1`` once the listeners are up,
``STOPPING=1`` at shutdown, ``STATUS=...`` for ``systemctl status``, ``WATCHDOG=1`` at half the
``WatchdogSec=`` interval (``$WATCHDOG_USEC``), and ``EXTEND_TIMEOUT_USEC=`` while a start runs long.
Without ``$NOTIFY_SOCKET`` every call does nothing.

Socket activation: systemd passes listening sockets as file descriptors 3, 4, ... and says how
many in ``$LISTEN_FDS``, for the process ``$LISTEN_PID``.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Awaitable
from functools import partial
from typing import TypeVar

from .pipeline import await_ticking

T = TypeVar("T")
log = logging.getLogger(__name__)

LISTEN_FDS_START = 3
#: While a start goes on, systemd is asked every EXTEND_EVERY seconds to wait EXTENSION seconds more.
EXTEND_EVERY = 10.0
EXTENSION = 30.0


def notify(*states: str) -> bool:
    """Send ``states`` (e.g. ``"READY=1"``, ``"STATUS=serving"``) to systemd; False if not under systemd."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto("\n".join(states).encode(), address)
    except OSError as exc:  # a notification lost must not stop the service
        log.warning("sd_notify failed", extra={"notify_socket": address, "error": str(exc)})
        return False
    return True


async def extending_start(work: Awaitable[T], status: str, every: float = EXTEND_EVERY,
                          extension: float = EXTENSION) -> T:
    """Await ``work``, asking systemd for more time (``EXTEND_TIMEOUT_USEC``) every ``every`` seconds
    it runs. The recovery a start does after a crash (the store's garbage collection, the cleanup of
    ended tasks) grows with the store and waits on S3: without this, ``TimeoutStartSec=`` would kill a
    long start, and ``Restart=`` begin the same start again, for ever. A quick start sends nothing."""
    return await await_ticking(work, every, partial(
        notify, f"EXTEND_TIMEOUT_USEC={int(extension * 1_000_000)}", f"STATUS={status}"))


def watchdog_interval() -> float | None:
    """Seconds between ``WATCHDOG=1`` pings (half of ``WatchdogSec=``), or None if no watchdog is set."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2 / 1_000_000


def listen_sockets() -> list[socket.socket]:
    """The sockets systemd passed to this process (none without socket activation).

    The variables are removed once read so that a child process does not take them as its own.
    """
    pid, count = os.environ.get("LISTEN_PID", ""), os.environ.get("LISTEN_FDS", "")
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    if pid != str(os.getpid()) or not count.isdigit():
        return []
    sockets = []
    for fd in range(LISTEN_FDS_START, LISTEN_FDS_START + int(count)):
        os.set_inheritable(fd, False)
        sockets.append(socket.socket(fileno=fd))
    return sockets
