"""check-config checks what serve checks: sockets, groups, secret files, http auth.

Each broken configuration is fed to both ``check-config`` and ``serve``, run as
an unprivileged user the way the unit runs them (``User=``), and both must
refuse it with exit status 2, the same key and no traceback.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from saslauthd_oidc.config import parse_config
from saslauthd_oidc.service import preflight as preflight_module
from saslauthd_oidc.service.listeners import open_listeners
from saslauthd_oidc.service.preflight import preflight
from saslauthd_oidc.tools.cli import main

CLI = [sys.executable, "-m", "saslauthd_oidc"]
UNPRIVILEGED = "nobody"
# A group the unprivileged user is not in (Postfix's on a mail host; root's anywhere).
FOREIGN_GROUP = "postfix" if "postfix" in {g.gr_name for g in grp.getgrall()} else "root"

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="running a command as another user needs root and setpriv",
)

PROVIDER = '[[provider]]\nname = "idp"\nissuer = "https://idp.example.org"\n'
RULE = '[[rule]]\nname = "mail"\nprovider = "idp"\naudiences = ["mail"]\n'


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory the unprivileged user can reach (pytest's tmp_path is 0700 root)."""
    path = Path(tempfile.mkdtemp(prefix="saslauthd-oidc-preflight-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def as_user(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = ["setpriv", f"--reuid={UNPRIVILEGED}", "--regid=nogroup", "--clear-groups", *CLI]
    return subprocess.run(
        [*cmd, *args], capture_output=True, text=True, timeout=60, check=False, cwd="/"
    )


def write_config(directory: Path, text: str) -> Path:
    path = directory / "saslauthd-oidc.toml"
    path.write_text(text)
    path.chmod(0o644)
    return path


def private_dir(d: Path) -> str:
    """Postfix's private/: 0700, owned by someone else."""
    (d / "private").mkdir(mode=0o700)
    return f'[server]\nauth_socket = "{d}/private/auth"\n' + PROVIDER + RULE


def run_dir(d: Path) -> Path:
    """A directory the daemon's user may create its socket in."""
    run = d / "run"
    run.mkdir(exist_ok=True)
    run.chmod(0o777)
    return run


def foreign_group(d: Path) -> str:
    return (
        f'[server]\nauth_socket = "{run_dir(d)}/auth"\nauth_socket_group = "{FOREIGN_GROUP}"\n'
        + PROVIDER
        + RULE
    )


def missing_group(d: Path) -> str:
    return (
        f'[server]\nauth_socket = "{run_dir(d)}/auth"\nauth_socket_group = "no-such-group-x"\n'
        + PROVIDER
        + RULE
    )


def secret(d: Path, name: str, mode: int) -> Path:
    path = d / name
    path.write_text("s3cret-value\n")
    path.chmod(mode)
    return path


def world_readable_client_secret(d: Path) -> str:
    path = secret(d, "client.secret", 0o644)
    return (
        f'[server]\nauth_socket = "{run_dir(d)}/auth"\n'
        + PROVIDER
        + f'client_id = "mail"\nclient_secret_file = "{path}"\n'
        + RULE
    )


def world_writable_hmac_secret(d: Path) -> str:
    path = secret(d, "hmac.secret", 0o606)
    return (
        f'[server]\nauth_socket = "{run_dir(d)}/auth"\n'
        + PROVIDER
        + f'algorithms = ["HS256"]\nhmac_secret_file = "{path}"\n'
        + RULE
    )


def root_only_client_secret(d: Path) -> str:
    path = secret(d, "client.secret", 0o600)  # root:root 0600: the daemon's user cannot read it
    return (
        f'[server]\nauth_socket = "{run_dir(d)}/auth"\n'
        + PROVIDER
        + f'client_id = "mail"\nclient_secret_file = "{path}"\n'
        + RULE
    )


def http_users_world_readable(d: Path) -> str:
    path = secret(d, "users", 0o644)
    path.write_text("dovecot:pw\n")
    return (
        f'[server]\nauth_socket = "{run_dir(d)}/auth"\nhttp_listen = "127.0.0.1:1"\n'
        f'[http]\nusers_file = "{path}"\n' + PROVIDER + RULE
    )


def missing_ca_file(d: Path) -> str:
    return (
        f'[server]\nauth_socket = "{run_dir(d)}/auth"\n'
        + PROVIDER
        + f'ca_file = "{d}/no-such-ca.pem"\n'
        + RULE
    )


def privileged_http_port(d: Path) -> str:
    return (
        f'[server]\nauth_socket = "{run_dir(d)}/auth"\nhttp_listen = "127.0.0.1:80"\n'
        '[http]\nauth = "open"\n' + PROVIDER + RULE
    )


def short_hmac_secret(d: Path) -> str:
    path = secret(d, "hmac.secret", 0o600)  # private and the daemon's, but 12 bytes for HS256
    user = pwd.getpwnam(UNPRIVILEGED)
    os.chown(path, user.pw_uid, user.pw_gid)
    return (
        f'[server]\nauth_socket = "{run_dir(d)}/auth"\n'
        + PROVIDER
        + f'algorithms = ["HS256"]\nhmac_secret_file = "{path}"\n'
        + RULE
    )


BROKEN: list[tuple[Callable[[Path], str], str, str]] = [
    (private_dir, "server.auth_socket", "may not write there"),
    (foreign_group, "server.auth_socket_group", f"is not a member of group '{FOREIGN_GROUP}'"),
    (missing_group, "server.auth_socket_group", "no such group"),
    (world_readable_client_secret, "provider[0].client_secret_file", "mode 0644"),
    (world_writable_hmac_secret, "provider[0].hmac_secret_file", "mode 0606"),
    (root_only_client_secret, "provider[0].client_secret_file", "Permission denied"),
    (http_users_world_readable, "http.users_file", "readable or writable by others"),
    (missing_ca_file, "provider[0].ca_file", "cannot load"),
    (short_hmac_secret, "provider[0].hmac_secret_file", "HMAC secret shorter than 32 bytes"),
    (privileged_http_port, "server.http_listen", "cannot listen on 127.0.0.1:80"),
]


@needs_root
@pytest.mark.parametrize(("make", "key", "fragment"), BROKEN, ids=[b[0].__name__ for b in BROKEN])
def test_check_config_and_serve_refuse_alike(
    shared_dir: Path, make: Callable[[Path], str], key: str, fragment: str
) -> None:
    start = Path("/proc/sys/net/ipv4/ip_unprivileged_port_start")
    if make is privileged_http_port and start.exists() and int(start.read_text()) <= 80:
        pytest.skip("port 80 is not privileged on this host")
    config = write_config(shared_dir, make(shared_dir))
    for command in ("check-config", "serve"):
        r = as_user(command, "--config", str(config))
        assert r.returncode == 2, (command, r.stdout, r.stderr)
        first = r.stderr.splitlines()[0]
        assert first.startswith(f"saslauthd-oidc: config error: {key}: "), (command, r.stderr)
        assert fragment in first, (command, r.stderr)
        assert "Traceback" not in r.stderr, (command, r.stderr)
        assert "s3cret-value" not in r.stdout + r.stderr
    assert not (shared_dir / "run" / "auth").exists()  # serve left nothing behind


@needs_root
def test_secret_file_advice_fits_the_install_layout(shared_dir: Path) -> None:
    config = write_config(shared_dir, world_readable_client_secret(shared_dir))
    r = as_user("check-config", "--config", str(config))
    assert "chmod 0640" in r.stderr and "root:saslauthd-oidc" in r.stderr
    assert "chmod 0600" not in r.stderr
    lines = config.read_text().splitlines()
    line = next(n for n, x in enumerate(lines, 1) if x.startswith("client_secret_file"))
    assert 'provider "idp"' in r.stderr and f"line {line})" in r.stderr


@needs_root
def test_check_config_ok_as_the_daemon_user(shared_dir: Path) -> None:
    config = write_config(
        shared_dir, f'[server]\nauth_socket = "{shared_dir}/auth"\n' + PROVIDER + RULE
    )
    shared_dir.chmod(0o777)  # writable for the unprivileged user
    r = as_user("check-config", "--config", str(config))
    assert r.returncode == 0, r.stderr
    assert "ok" in r.stdout


def test_root_check_config_warns_when_the_daemon_user_cannot_read_a_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    if os.geteuid() != 0:
        pytest.skip("the daemon-user reading check is for root's check-config")
    monkeypatch.setattr(preflight_module, "DAEMON_USER", UNPRIVILEGED)
    path = secret(tmp_path, "client.secret", 0o600)
    config = tmp_path / "c.toml"
    config.write_text(
        f'[server]\nauth_socket = "{tmp_path}/auth"\n'
        + PROVIDER
        + f'client_id = "mail"\nclient_secret_file = "{path}"\n'
        + RULE
    )
    assert main(["check-config", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert f"warning: provider[0].client_secret_file: {path}" in out
    assert f"not readable by the daemon's user {UNPRIVILEGED}" in out


def test_a_socket_already_served_is_not_checked(tmp_path: Path) -> None:
    path = tmp_path / "ro" / "auth"
    path.parent.mkdir()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    try:
        cfg = parse_config(
            {
                "server": {"auth_socket": str(path), "auth_socket_group": "no-such-group-x"},
                "provider": [{"name": "idp", "issuer": "https://idp.example.org"}],
                "rule": [{"provider": "idp", "audiences": ["mail"]}],
            }
        )
        check = preflight(cfg)
        assert check.problems == []
        assert any("something listens there already" in n for n in check.notes)
        passed = preflight(cfg, ["auth"])
        assert passed.problems == []
        assert any("is not used: systemd passes the 'auth' socket" in n for n in passed.notes)
    finally:
        listener.close()


async def test_socket_activation_logs_the_served_socket_and_the_unused_path(tmp_path: Path) -> None:
    served = tmp_path / "systemd-auth"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(served))
    listener.listen(1)
    fd = os.dup(listener.fileno())
    listener.close()
    cfg = parse_config(
        {
            "server": {"auth_socket": str(tmp_path / "configured")},
            "provider": [{"name": "idp", "issuer": "https://idp.example.org"}],
            "rule": [{"provider": "idp", "audiences": ["mail"]}],
        }
    )
    with capture_logs() as logs:
        listeners = open_listeners(cfg, {"auth": [fd]})
    try:
        [event] = [e for e in logs if e["event"] == "socket_activation"]
        assert event["socket"] == [str(served)]
        assert event["not_used"] == [str(tmp_path / "configured")]
        assert event["log_level"] == "warning"
        assert "server.auth_socket in the config is not used" in event["detail"]
        assert not (tmp_path / "configured").exists()
    finally:
        listeners.close()


def _cfg(server: dict[str, Any], http: dict[str, Any] | None = None) -> Any:
    data: dict[str, Any] = {
        "server": server,
        "provider": [{"name": "idp", "issuer": "https://idp.example.org"}],
        "rule": [{"provider": "idp", "audiences": ["mail"]}],
    }
    if http is not None:
        data["http"] = http
    return parse_config(data)


def test_a_stale_socket_file_is_checked(tmp_path: Path) -> None:
    path = tmp_path / "auth"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens
    check = preflight(_cfg({"auth_socket": str(path), "auth_socket_group": "no-such-group-x"}))
    assert [p.key for p in check.problems] == ["server.auth_socket_group"]


def test_passed_http_socket_needs_caller_auth() -> None:
    # Not fatal to serve (the auth socket stays up, /introspect refuses every
    # caller), but check-config reports it: preflight lists it as degraded.
    cfg = _cfg({"auth_socket": ""})
    check = preflight(cfg, ["http"])
    assert check.problems == []
    assert [p.key for p in check.degraded] == ["http.auth"]
    fixed = preflight(_cfg({"auth_socket": ""}, {"auth": "open"}), ["http"])
    assert fixed.problems == [] and fixed.degraded == []


def test_root_check_config_warns_when_the_daemon_user_cannot_create_the_socket(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if os.geteuid() != 0:
        pytest.skip("the daemon-user socket check is for root's check-config")
    monkeypatch.setattr(preflight_module, "DAEMON_USER", UNPRIVILEGED)
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    check = preflight(
        _cfg({"auth_socket": str(private / "auth"), "auth_socket_group": FOREIGN_GROUP})
    )
    assert check.problems == []  # root itself could
    assert any(
        w.startswith("server.auth_socket: the daemon's user nobody may not create")
        for w in check.warnings
    )
    assert any(
        w.startswith("server.auth_socket_group: the daemon's user nobody is not in group")
        for w in check.warnings
    )


@needs_root
def test_postfix_private_dir_gets_the_chroot_advice(shared_dir: Path) -> None:
    private = Path("/var/spool/postfix/private")
    if not private.is_dir() or private.stat().st_mode & 0o077:
        pytest.skip("no Postfix private/ directory (0700) here")
    config = write_config(
        shared_dir, f'[server]\nauth_socket = "{private}/saslauthd-oidc"\n' + PROVIDER + RULE
    )
    for command in ("check-config", "serve"):
        r = as_user(command, "--config", str(config))
        assert r.returncode == 2, r.stderr
        assert "config error: server.auth_socket: cannot create the socket in " in r.stderr
        assert "Postfix's chrooted smtpd" in r.stderr and "install -d -o saslauthd-oidc" in r.stderr
    assert not (private / "saslauthd-oidc").exists()


def test_check_config_passed_http_socket_needs_caller_auth(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[server]\nauth_socket = ""\n' + PROVIDER + RULE)
    assert main(["check-config", "--config", str(config)]) == 0
    capsys.readouterr()
    assert main(["check-config", "--config", str(config), "--passed", "auth,http"]) == 2
    assert "config error: http.auth: systemd passes an http socket" in capsys.readouterr().err
    assert main(["check-config", "--config", str(config), "--passed", "htp"]) == 2
    assert "--passed: 'htp' is not a socket name" in capsys.readouterr().err


def test_workers_limits_are_checked_by_check_config_too(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "c.toml"
    config.write_text(
        f'[server]\nauth_socket = "{tmp_path}/auth"\nsaslauthd_socket = "{tmp_path}/mux"\n'
        "workers = 2\n" + PROVIDER + RULE
    )
    for command in ("check-config", "serve"):
        assert main([command, "--config", str(config)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("saslauthd-oidc: config error: server.workers: more than one worker")
        assert "line 4" in err
    assert not (tmp_path / "auth").exists()
