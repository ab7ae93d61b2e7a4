"""service/systemd.py: LISTEN_FDS parsing (pure) and sd_notify datagrams to a real socket."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trio

from saslauthd_oidc.config import ConfigError, parse_config
from saslauthd_oidc.service.daemon import run_daemon
from saslauthd_oidc.service.listeners import adopt_passed_socket, http_problems, sort_passed_fds
from saslauthd_oidc.service.systemd import (
    ActivationError,
    Notifier,
    notify_address,
    parse_listen_fds,
    take_listen_fds,
    watchdog_interval,
)
from saslauthd_oidc.tools.authtest import run_auth_test
from saslauthd_oidc.tools.devissuer import DevIssuer

PID = 4242


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"LISTEN_FDS": "1", "LISTEN_PID": "1"}, None),  # for another process
        ({"LISTEN_FDS": "0", "LISTEN_PID": str(PID)}, None),
        ({"LISTEN_FDS": "1", "LISTEN_PID": str(PID)}, {"unknown": [3]}),
        ({"LISTEN_FDS": "1"}, {"unknown": [3]}),  # no LISTEN_PID: taken as ours
        (
            {"LISTEN_FDS": "3", "LISTEN_PID": str(PID), "LISTEN_FDNAMES": "auth:saslauthd:http"},
            {"auth": [3], "saslauthd": [4], "http": [5]},
        ),
        (
            {"LISTEN_FDS": "3", "LISTEN_PID": str(PID), "LISTEN_FDNAMES": "auth:http:http"},
            {"auth": [3], "http": [4, 5]},
        ),
        ({"LISTEN_FDS": "2", "LISTEN_FDNAMES": "auth:"}, {"auth": [3], "unknown": [4]}),
    ],
)
def test_parse_listen_fds(env: dict[str, str], expected: dict[str, list[int]] | None) -> None:
    assert parse_listen_fds(env, PID) == expected


@pytest.mark.parametrize(
    ("env", "words"),
    [
        ({"LISTEN_FDS": "x"}, "LISTEN_FDS='x'"),
        ({"LISTEN_FDS": "-1"}, "out of range"),
        ({"LISTEN_FDS": "1", "LISTEN_PID": "me"}, "LISTEN_PID"),
        ({"LISTEN_FDS": "2", "LISTEN_FDNAMES": "auth"}, "1 names for LISTEN_FDS=2"),
    ],
)
def test_parse_listen_fds_errors(env: dict[str, str], words: str) -> None:
    result = parse_listen_fds(env, PID)
    assert isinstance(result, ActivationError)
    assert words in result.detail


def test_take_listen_fds_unsets_the_variables() -> None:
    env = {"LISTEN_FDS": "1", "LISTEN_PID": "1", "LISTEN_FDNAMES": "auth", "OTHER": "kept"}
    assert take_listen_fds(env, PID) is None  # meant for pid 1; unset all the same
    assert env == {"OTHER": "kept"}
    env = {"LISTEN_FDS": "many"}
    assert isinstance(take_listen_fds(env, PID), ActivationError)
    assert env == {}


def test_watchdog_interval() -> None:
    assert watchdog_interval({}, PID) is None
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}, PID) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(PID)}, PID) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, PID) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}, PID) is None
    assert watchdog_interval({"WATCHDOG_USEC": "soon"}, PID) is None


def test_notify_address() -> None:
    assert notify_address(None) is None
    assert notify_address("") is None
    assert notify_address("/run/systemd/notify") == "/run/systemd/notify"
    assert notify_address("@abstract/name") == b"\0abstract/name"
    assert notify_address("vsock:2:1234") is None


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    yield path, sock
    sock.close()


def _fields(sock: socket.socket) -> dict[str, str]:
    return dict(line.split("=", 1) for line in sock.recv(4096).decode().splitlines())


def test_notifier_sends_one_datagram_per_message(receiver: tuple[str, socket.socket]) -> None:
    path, sock = receiver
    notifier = Notifier({"NOTIFY_SOCKET": path})
    assert notifier.enabled
    assert notifier.ready(status="serving 2 rules")
    assert _fields(sock) == {"READY": "1", "STATUS": "serving 2 rules"}
    assert notifier.reloading()
    reloading = _fields(sock)
    assert reloading["RELOADING"] == "1" and int(reloading["MONOTONIC_USEC"]) > 0
    assert notifier.stopping()
    assert _fields(sock) == {"STOPPING": "1"}
    assert notifier.ping()
    assert _fields(sock) == {"WATCHDOG": "1"}
    assert notifier.status("reload failed")
    assert _fields(sock) == {"STATUS": "reload failed"}
    notifier.close()


def test_notifier_abstract_socket() -> None:
    name = f"saslauthd-oidc-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(5)
        notifier = Notifier({"NOTIFY_SOCKET": "@" + name})
        assert notifier.ready()
        assert _fields(sock) == {"READY": "1"}
        notifier.close()


def test_notifier_without_socket_is_a_no_op(tmp_path: Path) -> None:
    assert not Notifier({}).ready()
    # a socket that went away: a lost message, never an exception
    assert not Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone")}).ready()


def test_sort_passed_fds() -> None:
    assert sort_passed_fds({"unknown": [3]}) == {"auth": [3]}
    assert sort_passed_fds({"auth": [3], "http": [4, 5]}) == {"auth": [3], "http": [4, 5]}
    with pytest.raises(ConfigError, match=r"LISTEN_FDNAMES: .*named 'imap'"):
        sort_passed_fds({"auth": [3], "imap": [4]})
    with pytest.raises(ConfigError, match="2 sockets named 'auth'"):
        sort_passed_fds({"auth": [3, 4]})
    with pytest.raises(ConfigError, match="named 'unknown'"):
        sort_passed_fds({"unknown": [3, 4]})


def test_adopt_passed_socket_checks_family_type_and_listening(tmp_path: Path) -> None:
    listening = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listening.bind(str(tmp_path / "ok"))
    listening.listen()
    adopted = adopt_passed_socket(
        os.dup(listening.fileno()), "auth", "server.auth_socket", unix_only=True
    )
    assert adopted.family == socket.AF_UNIX and not adopted.getblocking()
    adopted.close()
    listening.close()

    dgram = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    with pytest.raises(ConfigError, match=r"server.auth_socket: .*AF_UNIX SOCK_DGRAM"):
        adopt_passed_socket(dgram.detach(), "auth", "server.auth_socket", unix_only=True)

    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.bind(("127.0.0.1", 0))
    tcp.listen()
    with pytest.raises(ConfigError, match=r"server.saslauthd_socket: .*AF_INET SOCK_STREAM"):
        adopt_passed_socket(
            os.dup(tcp.fileno()), "saslauthd", "server.saslauthd_socket", unix_only=True
        )
    http = adopt_passed_socket(tcp.detach(), "http", "server.http_listen", unix_only=False)
    http.close()

    unbound = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with pytest.raises(ConfigError, match="not listening"):
        adopt_passed_socket(unbound.detach(), "auth", "server.auth_socket", unix_only=True)

    r, w = os.pipe()
    os.close(w)
    with pytest.raises(ConfigError, match="is not a socket"):
        adopt_passed_socket(r, "auth", "server.auth_socket", unix_only=True)
    os.close(r)


async def test_passed_http_socket_without_caller_credentials_spares_the_auth_socket(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """The shipped [http] defaults with saslauthd-oidc-http.socket enabled: not fatal.

    serve keeps the auth socket (Postfix) working; the http socket answers,
    but refuses every /introspect caller, until http.auth is configured.
    """
    issuer = DevIssuer()
    await nursery.start(issuer.serve)
    assert issuer.issuer
    config = parse_config(
        {
            "server": {"auth_socket": str(tmp_path / "auth")},
            "provider": [{"name": "p", "issuer": issuer.issuer, "allow_http": True}],
            "rule": [{"name": "r", "provider": "p", "audiences": ["mail"]}],
        }
    )
    problems = http_problems(config, http_passed=True)
    assert [p.key for p in problems] == ["http.auth"]
    assert http_problems(config, http_passed=False) == []
    http = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    http.bind(("127.0.0.1", 0))
    http.listen()
    port = http.getsockname()[1]
    await nursery.start(
        lambda task_status: run_daemon(
            config,
            task_status=task_status,
            handle_signals=False,
            passed_fds={"http": [http.detach()]},
        )
    )
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        reply = await client.post(
            "/introspect",
            content=f"token={issuer.mint()}",
            headers={"content-type": "application/x-www-form-urlencoded"},
        )
        assert reply.status_code == 401
        assert (await client.get("/healthz")).status_code == 200
    result = await run_auth_test(str(tmp_path / "auth"), issuer.mint(), user="alice@example.org")
    assert result.outcome.value == "ok"
    nursery.cancel_scope.cancel()
