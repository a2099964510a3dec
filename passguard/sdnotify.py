"""The systemd notify protocol (``sd_notify(3)``), standard library only.

systemd gives a ``Type=notify`` service the address of a datagram socket in
``$NOTIFY_SOCKET``: a file system path (``/run/systemd/notify``) or, when it
starts with ``@``, a name in the Linux abstract namespace (the ``@`` stands for
a leading NUL byte). Each message is one datagram of newline-separated
``KEY=VALUE`` assignments:

- ``READY=1``: start-up finished; ``systemctl start`` returns only now.
- ``RELOADING=1`` + ``MONOTONIC_USEC=…``: a reload began; ``READY=1`` ends it.
- ``STOPPING=1``: shutdown began.
- ``WATCHDOG=1``: keep-alive; without one every ``WatchdogSec=`` the service
  is killed (SIGABRT) and, with ``Restart=on-failure``, started again.
- ``STATUS=…``: one line shown by ``systemctl status``.

Outside systemd (no ``$NOTIFY_SOCKET``) every call is a no-op, so the daemon
can call these methods unconditionally. Sending never raises: a failure is
logged at warning level once, then at debug level until a send succeeds again,
so a broken socket can neither crash the daemon nor flood the journal.

The daemon's side of the contract (see ``docs/systemd.md``):

- ``ready()`` once the HTTP server listens and a first scrape cycle finished
  or state was restored (the same condition as ``GET /-/ready``);
- ``watchdog()`` every ``watchdog_interval()`` seconds *from the event loop*
  (``run_watchdog()`` is such a task), so a stuck loop stops the pings;
- ``reloading()`` before a SIGHUP / ``POST /-/reload`` reload and ``ready()``
  after it, whether the new config was accepted or refused;
- ``stopping()`` when SIGTERM/SIGINT arrives, before draining.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
from collections.abc import Mapping, MutableMapping

__all__ = ["Notifier"]

log = logging.getLogger(__name__)

#: How long one send may block (systemd reads its notify socket promptly; this
#: only bounds the pathological case of a full socket buffer).
SEND_TIMEOUT_SECONDS = 1.0


def _socket_address(value: str) -> bytes | None:
    """The ``sendto()`` address for a ``$NOTIFY_SOCKET`` value, None if unusable."""
    if value.startswith("/"):
        return os.fsencode(value)
    if value.startswith("@") and len(value) > 1:
        return b"\0" + os.fsencode(value[1:])
    return None


def _positive_int(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        number = int(value.strip(), 10)
    except ValueError:
        return None
    return number if number > 0 else None


class Notifier:
    """Sends sd_notify messages to the service manager; a no-op outside systemd.

    ``address`` is the raw ``$NOTIFY_SOCKET`` value (``/path`` or ``@abstract``),
    or None to disable notifications. ``watchdog_usec`` and ``watchdog_pid`` are
    the raw ``$WATCHDOG_USEC`` / ``$WATCHDOG_PID`` values.
    """

    def __init__(
        self,
        address: str | None,
        *,
        watchdog_usec: str | None = None,
        watchdog_pid: str | None = None,
        send_timeout: float = SEND_TIMEOUT_SECONDS,
    ) -> None:
        self._raw_address = address or None
        self._address: bytes | None = None
        self._send_timeout = send_timeout
        self._socket: socket.socket | None = None
        self._failing = False
        self._lock = threading.Lock()
        self._watchdog_usec = watchdog_usec
        self._watchdog_pid = watchdog_pid
        if self._raw_address is not None:
            self._address = _socket_address(self._raw_address)
            if self._address is None:
                log.warning(
                    "NOTIFY_SOCKET=%r is not a path or an @abstract socket name: "
                    "systemd notifications are disabled",
                    self._raw_address,
                )

    @classmethod
    def from_env(
        cls,
        environ: MutableMapping[str, str] | None = None,
        *,
        unset_environment: bool = False,
    ) -> Notifier:
        """Build a notifier from ``NOTIFY_SOCKET``, ``WATCHDOG_USEC``, ``WATCHDOG_PID``.

        With ``unset_environment`` the three variables are removed from
        ``environ`` (default ``os.environ``) afterwards, so child processes do
        not inherit them, as ``sd_notify(unset_environment=1, …)`` does.
        """
        env: MutableMapping[str, str] = os.environ if environ is None else environ
        notifier = cls(
            env.get("NOTIFY_SOCKET"),
            watchdog_usec=env.get("WATCHDOG_USEC"),
            watchdog_pid=env.get("WATCHDOG_PID"),
        )
        if unset_environment:
            for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
                env.pop(name, None)
        return notifier

    @property
    def enabled(self) -> bool:
        """True when messages are actually sent (running under systemd)."""
        return self._address is not None

    # -- messages ---------------------------------------------------------

    def ready(self, status: str | None = None) -> bool:
        """``READY=1``: start-up (or a reload) finished."""
        return self._send_fields({"READY": "1"}, status)

    def reloading(self, status: str | None = None) -> bool:
        """``RELOADING=1`` with ``MONOTONIC_USEC``; follow with ``ready()``."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self._send_fields({"RELOADING": "1", "MONOTONIC_USEC": str(usec)}, status)

    def stopping(self, status: str | None = None) -> bool:
        """``STOPPING=1``: shutdown began."""
        return self._send_fields({"STOPPING": "1"}, status)

    def watchdog(self) -> bool:
        """``WATCHDOG=1``: the keep-alive ping."""
        return self._send_fields({"WATCHDOG": "1"}, None)

    def status(self, text: str) -> bool:
        """``STATUS=<text>``: one line for ``systemctl status`` (newlines become spaces)."""
        return self._send_fields({}, text)

    def extend_timeout(self, seconds: float) -> bool:
        """``EXTEND_TIMEOUT_USEC``: ask for more time in the current start/stop/reload."""
        return self._send_fields({"EXTEND_TIMEOUT_USEC": str(max(0, int(seconds * 1e6)))}, None)

    def send(self, message: str) -> bool:
        """Send a raw message; True if it was delivered (False also when disabled)."""
        if self._address is None:
            return False
        with self._lock:
            return self._send_locked(message, self._address)

    def _send_locked(self, message: str, address: bytes) -> bool:
        try:
            sock = self._socket
            if sock is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                sock.settimeout(self._send_timeout)
                self._socket = sock
            sock.sendto(message.encode("utf-8", "replace"), address)
        except OSError as exc:
            self._close_socket()
            if self._failing:
                log.debug("systemd notification to %s failed: %s", self._raw_address, exc)
            else:
                self._failing = True
                log.warning(
                    "systemd notification to %s failed: %s (further failures are logged "
                    "at debug level until one succeeds)",
                    self._raw_address,
                    exc,
                )
            return False
        if self._failing:
            self._failing = False
            log.info("systemd notifications to %s work again", self._raw_address)
        return True

    # -- watchdog ---------------------------------------------------------

    def watchdog_interval(self) -> float | None:
        """Seconds between ``WATCHDOG=1`` pings: half of ``WATCHDOG_USEC``.

        None when no watchdog is requested: ``WATCHDOG_USEC`` unset or invalid,
        or ``WATCHDOG_PID`` set to another process (the variables were inherited).
        """
        usec = _positive_int(self._watchdog_usec)
        if usec is None:
            return None
        if self._watchdog_pid is not None and _positive_int(self._watchdog_pid) != os.getpid():
            return None
        return usec / 2 / 1_000_000

    async def run_watchdog(self) -> None:
        """Ping the watchdog forever at ``watchdog_interval()``; returns at once if none.

        Run it as a task on the daemon's event loop and cancel it on shutdown:
        the pings stop when the loop is blocked, which is what the watchdog is for.
        """
        interval = self.watchdog_interval()
        if interval is None or not self.enabled:
            return
        while True:
            self.watchdog()
            await asyncio.sleep(interval)

    # -- lifecycle --------------------------------------------------------

    def close(self) -> None:
        """Close the socket (sending again reopens it)."""
        with self._lock:
            self._close_socket()

    def _close_socket(self) -> None:
        sock, self._socket = self._socket, None
        if sock is not None:
            sock.close()

    def _send_fields(self, fields: Mapping[str, str], status: str | None) -> bool:
        lines = [f"{key}={value}" for key, value in fields.items()]
        if status is not None:
            lines.append("STATUS=" + " ".join(status.splitlines()))
        return self.send("\n".join(lines))

    def __repr__(self) -> str:
        return f"Notifier(address={self._raw_address!r}, enabled={self.enabled})"
