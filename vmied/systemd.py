"""The systemd protocols vmied speaks, without a library: sd_notify and socket activation.

sd_notify: one datagram of ``KEY=VALUE`` lines to the AF_UNIX socket named by ``$NOTIFY_SOCKET``
(a leading ``@`` means Linux's abstract namespace). ``READY=1`` once the listeners are up,
``STOPPING=1`` at shutdown, ``STATUS=...`` for ``systemctl status``, ``WATCHDOG=1`` at half the
``WatchdogSec=`` interval (``$WATCHDOG_USEC``). Without ``$NOTIFY_SOCKET`` every call does nothing.

Socket activation: systemd passes listening sockets as file descriptors 3, 4, ... and says how
many in ``$LISTEN_FDS``, for the process ``$LISTEN_PID``.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)

LISTEN_FDS_START = 3


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
