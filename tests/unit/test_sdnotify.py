"""sd_notify against a real AF_UNIX datagram socket, as systemd would listen on."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator

import pytest

from passguard.sdnotify import Notifier


class Receiver:
    """A bound datagram socket standing in for systemd's notify socket."""

    def __init__(self, sock: socket.socket, env_value: str) -> None:
        self.sock = sock
        self.env_value = env_value

    def recv(self) -> str:
        data = self.sock.recv(4096)
        return data.decode("utf-8")

    def fields(self) -> dict[str, str]:
        return dict(line.split("=", 1) for line in self.recv().split("\n"))

    def nothing_pending(self) -> bool:
        self.sock.setblocking(False)
        try:
            self.sock.recv(4096)
        except BlockingIOError:
            return True
        finally:
            self.sock.settimeout(2.0)
        return False


@pytest.fixture
def short_dir() -> Iterator[str]:
    # AF_UNIX paths are limited to 107 bytes: pytest's tmp_path can be longer.
    path = tempfile.mkdtemp(prefix="pg-sd-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def path_receiver(short_dir: str) -> Iterator[Receiver]:
    address = os.path.join(short_dir, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(2.0)
    yield Receiver(sock, address)
    sock.close()


@pytest.fixture
def abstract_receiver() -> Iterator[Receiver]:
    name = f"passguard-test-{os.getpid()}-{time.monotonic_ns()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    sock.settimeout(2.0)
    yield Receiver(sock, "@" + name)
    sock.close()


@pytest.fixture(params=["path", "abstract"])
def receiver(request: pytest.FixtureRequest) -> Receiver:
    fixture = "path_receiver" if request.param == "path" else "abstract_receiver"
    value: Receiver = request.getfixturevalue(fixture)
    return value


def test_from_env_without_notify_socket_is_a_silent_no_op() -> None:
    env: dict[str, str] = {}
    notifier = Notifier.from_env(env)
    assert not notifier.enabled
    assert notifier.ready() is False
    assert notifier.reloading() is False
    assert notifier.stopping() is False
    assert notifier.watchdog() is False
    assert notifier.status("x") is False
    assert notifier.watchdog_interval() is None


def test_from_env_reads_os_environ_by_default(
    monkeypatch: pytest.MonkeyPatch, path_receiver: Receiver
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", path_receiver.env_value)
    notifier = Notifier.from_env()
    assert notifier.enabled
    assert notifier.ready()
    assert path_receiver.recv() == "READY=1"
    notifier.close()


def test_ready(receiver: Receiver) -> None:
    notifier = Notifier.from_env({"NOTIFY_SOCKET": receiver.env_value})
    assert notifier.enabled
    assert notifier.ready() is True
    assert receiver.recv() == "READY=1"
    notifier.close()


def test_ready_with_status(receiver: Receiver) -> None:
    notifier = Notifier.from_env({"NOTIFY_SOCKET": receiver.env_value})
    notifier.ready(status="scraping 12 dataplanes")
    assert receiver.fields() == {"READY": "1", "STATUS": "scraping 12 dataplanes"}
    notifier.close()


def test_reloading_carries_the_monotonic_clock_in_microseconds(receiver: Receiver) -> None:
    notifier = Notifier.from_env({"NOTIFY_SOCKET": receiver.env_value})
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    notifier.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    message = receiver.recv()
    assert message.startswith("RELOADING=1\nMONOTONIC_USEC=")
    fields = dict(line.split("=", 1) for line in message.split("\n"))
    assert before <= int(fields["MONOTONIC_USEC"]) <= after
    notifier.close()


def test_stopping_watchdog_status(receiver: Receiver) -> None:
    notifier = Notifier.from_env({"NOTIFY_SOCKET": receiver.env_value})
    notifier.stopping()
    assert receiver.recv() == "STOPPING=1"
    notifier.watchdog()
    assert receiver.recv() == "WATCHDOG=1"
    notifier.status("degraded: 3 targets failing")
    assert receiver.recv() == "STATUS=degraded: 3 targets failing"
    notifier.extend_timeout(30)
    assert receiver.recv() == "EXTEND_TIMEOUT_USEC=30000000"
    notifier.close()


def test_status_is_kept_on_one_line(receiver: Receiver) -> None:
    notifier = Notifier.from_env({"NOTIFY_SOCKET": receiver.env_value})
    notifier.status("line one\nREADY=1\r\nline three")
    # A newline would start a new assignment: a status text must not be able to say READY=1.
    assert receiver.recv() == "STATUS=line one READY=1 line three"
    notifier.close()


def test_each_message_is_one_datagram(receiver: Receiver) -> None:
    notifier = Notifier.from_env({"NOTIFY_SOCKET": receiver.env_value})
    for _ in range(3):
        notifier.watchdog()
    assert [receiver.recv() for _ in range(3)] == ["WATCHDOG=1"] * 3
    assert receiver.nothing_pending()
    notifier.close()


def test_unset_environment_removes_the_variables(path_receiver: Receiver) -> None:
    env = {
        "NOTIFY_SOCKET": path_receiver.env_value,
        "WATCHDOG_USEC": "30000000",
        "WATCHDOG_PID": str(os.getpid()),
        "OTHER": "kept",
    }
    notifier = Notifier.from_env(env, unset_environment=True)
    assert env == {"OTHER": "kept"}
    # The notifier still knows what it read.
    assert notifier.watchdog_interval() == 15.0
    notifier.ready()
    assert path_receiver.recv() == "READY=1"
    notifier.close()


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        ("30000000", None, 15.0),
        ("30000000", "self", 15.0),
        ("1000000", "self", 0.5),
        ("30000000", "other", None),
        ("0", None, None),
        ("-5", None, None),
        ("soon", None, None),
        (None, None, None),
        ("30000000", "garbage", None),
    ],
)
def test_watchdog_interval(usec: str | None, pid: str | None, expected: float | None) -> None:
    env: dict[str, str] = {"NOTIFY_SOCKET": "/run/systemd/notify"}
    if usec is not None:
        env["WATCHDOG_USEC"] = usec
    if pid == "self":
        env["WATCHDOG_PID"] = str(os.getpid())
    elif pid == "other":
        env["WATCHDOG_PID"] = str(os.getpid() + 1)
    elif pid is not None:
        env["WATCHDOG_PID"] = pid
    assert Notifier.from_env(env).watchdog_interval() == expected


def test_send_failure_does_not_raise_and_warns_once(
    short_dir: str, caplog: pytest.LogCaptureFixture
) -> None:
    missing = os.path.join(short_dir, "nobody-listens")
    notifier = Notifier.from_env({"NOTIFY_SOCKET": missing})
    assert notifier.enabled
    with caplog.at_level(logging.DEBUG, logger="passguard.sdnotify"):
        assert notifier.ready() is False
        assert notifier.watchdog() is False
        assert notifier.watchdog() is False
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert missing in warnings[0].getMessage()
    assert sum(r.levelno == logging.DEBUG for r in caplog.records) == 2


def test_warning_is_rearmed_after_a_success(
    short_dir: str, caplog: pytest.LogCaptureFixture
) -> None:
    address = os.path.join(short_dir, "notify")
    notifier = Notifier.from_env({"NOTIFY_SOCKET": address})
    with caplog.at_level(logging.INFO, logger="passguard.sdnotify"):
        assert notifier.watchdog() is False  # nobody listening yet: warning
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(address)
        sock.settimeout(2.0)
        try:
            assert notifier.watchdog() is True  # back: info
            assert sock.recv(100) == b"WATCHDOG=1"
        finally:
            sock.close()
        os.unlink(address)
        assert notifier.watchdog() is False  # gone again: a new warning
    levels = [r.levelno for r in caplog.records]
    assert levels == [logging.WARNING, logging.INFO, logging.WARNING]
    notifier.close()


@pytest.mark.parametrize("value", ["relative/path", "@", "vsock:2:1234"])
def test_unusable_address_disables_with_a_warning(
    value: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="passguard.sdnotify"):
        notifier = Notifier.from_env({"NOTIFY_SOCKET": value})
    assert not notifier.enabled
    assert notifier.ready() is False
    assert len(caplog.records) == 1


def test_empty_notify_socket_is_disabled_silently(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="passguard.sdnotify"):
        notifier = Notifier.from_env({"NOTIFY_SOCKET": ""})
    assert not notifier.enabled
    assert caplog.records == []


async def test_run_watchdog_pings_at_half_the_timeout(path_receiver: Receiver) -> None:
    notifier = Notifier.from_env(
        {"NOTIFY_SOCKET": path_receiver.env_value, "WATCHDOG_USEC": "100000"}
    )
    assert notifier.watchdog_interval() == 0.05
    task = asyncio.create_task(notifier.run_watchdog())
    try:
        loop = asyncio.get_running_loop()
        first = await loop.run_in_executor(None, path_receiver.recv)
        second = await loop.run_in_executor(None, path_receiver.recv)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert first == second == "WATCHDOG=1"
    notifier.close()


async def test_run_watchdog_returns_when_no_watchdog_is_requested(
    path_receiver: Receiver,
) -> None:
    notifier = Notifier.from_env({"NOTIFY_SOCKET": path_receiver.env_value})
    await asyncio.wait_for(notifier.run_watchdog(), timeout=1)
    assert path_receiver.nothing_pending()
