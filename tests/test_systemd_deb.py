"""The Debian package under a real systemd (PID 1) in systemd-nspawn, as an admin meets it.

The .deb is built here with ``dpkg-buildpackage -us -uc -b`` (twice: this
version and a previous one, for the upgrade), installed with apt from the
file into a minimal Debian 12 booted with systemd-nspawn (no network), and
driven with systemctl: socket activation, an authentication through the
socket (a development issuer inside the container on loopback), reload of
a good and of a broken file, stop, the watchdog, a broken configuration at
start, the http socket with the shipped defaults, upgrade, remove, purge.
The package ships the mypyc-compiled build (``--version`` says so).

Needs root, dpkg-dev, debhelper, dh-virtualenv, mmdebstrap and
systemd-container; skipped with the reason otherwise (a failure under
SASLAUTHD_OIDC_REQUIRE_PEERS=1, as in .ci/run). Builds and the OS tree are
cached in /var/cache/saslauthd-oidc-tests (by a hash of their inputs).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from saslauthd_oidc.service import build
from tests.conftest import require_peer
from tests.systemd_deb import harness
from tests.systemd_deb.harness import Container, Debs, apt_install, journal, status

pytestmark = pytest.mark.peer

HERE = Path(__file__).resolve().parent / "systemd_deb"
CONF = "/etc/saslauthd-oidc/saslauthd-oidc.toml"
AUTH = "/run/saslauthd-oidc/auth"
ISSUER_PORT = 9480
PROVIDER_AND_RULE = f"""
[[provider]]
name = "dev"
issuer = "http://127.0.0.1:{ISSUER_PORT}"
allow_http = true

[[rule]]
name = "mail"
provider = "dev"
audiences = ["mail"]
username = "{{email}}"
"""


@pytest.fixture(scope="module")
def debs(tmp_path_factory: pytest.TempPathFactory) -> Debs:
    require_peer("Debian packaging under systemd-nspawn", harness.unavailable())
    return harness.build_debs(tmp_path_factory.mktemp("deb") / "build")


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory, debs: Debs) -> Iterator[Path]:
    path = harness.os_tree(tmp_path_factory.mktemp("tree") / "root")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def share(tmp_path_factory: pytest.TempPathFactory, debs: Debs) -> Path:
    """What the container sees read-only at /srv/test."""
    path = tmp_path_factory.mktemp("share")
    shutil.copy2(debs.current, path / "current.deb")
    shutil.copy2(debs.previous, path / "previous.deb")
    for name in ("issuer.py", "client.py"):
        shutil.copy2(HERE / name, path / name)
    path.chmod(0o755)
    return path


@pytest.fixture
def ct(tree: Path, share: Path, tmp_path: Path) -> Iterator[Container]:
    with harness.booted(tree, share, tmp_path) as container:
        yield container


def install(ct: Container, deb: str = "/srv/test/current.deb") -> str:
    return apt_install(ct, deb).stdout


def start_issuer(ct: Container) -> None:
    ct.run(
        "systemd-run",
        "--unit=test-issuer",
        "/opt/venvs/saslauthd-oidc/bin/python",
        "/srv/test/issuer.py",
        str(ISSUER_PORT),
        "/root/token",
    )
    ct.run("rm", "-f", "/root/token")
    ct.wait_for(
        "the issuer's token",
        lambda: ct.run("test", "-s", "/root/token", check=False).returncode == 0,
    )


def configure(ct: Container) -> None:
    """The shipped file, edited in place: a provider and a rule appended."""
    ct.sh(f"cat >> {CONF}", input=PROVIDER_AND_RULE)


def authenticate(ct: Container) -> dict[str, object]:
    out = ct.run("python3", "/srv/test/client.py", AUTH, "/root/token", "alice@example.org")
    result: dict[str, object] = json.loads(out.stdout)
    return result


def active(ct: Container, unit: str) -> str:
    return ct.run("systemctl", "is-active", unit, check=False).stdout.strip()


# --------------------------------------------------------------------------- tests


def test_lintian_reports_no_error_and_no_unjustified_warning(debs: Debs) -> None:
    """Each remaining tag is overridden with its reason (debian/*.lintian-overrides)."""
    lintian = shutil.which("lintian")
    require_peer("lintian", None if lintian else "not installed (Debian: lintian)")
    assert lintian
    result = subprocess.run(
        [lintian, "--fail-on", "error,warning", str(debs.current)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    tags = [line for line in result.stdout.splitlines() if line[:2] in ("E:", "W:")]
    assert result.returncode == 0 and not tags, result.stdout + result.stderr


def test_install_gives_command_user_conffile_units_and_man_pages(ct: Container, debs: Debs) -> None:
    # A mail server already there (its user; the package must not need its group).
    ct.run("useradd", "--system", "--no-create-home", "Debian-exim")
    output = install(ct)
    assert "saslauthd-oidc-clients" in ct.run("id", "-nG", "Debian-exim").stdout.split()
    assert (
        f"saslauthd-oidc: not configured yet: add a [[provider]] and a [[rule]] to {CONF}" in output
    )
    # The package ships the mypyc-compiled build, every module of MYPYC_MODULES.
    assert ct.run("saslauthd-oidc", "--version").stdout.strip() == (
        f"saslauthd-oidc {debs.version.split('~')[0]} "
        f"(compiled: mypyc, {len(build.MYPYC_MODULES)} modules)"
    )
    site = "/opt/venvs/saslauthd-oidc/lib/python3.11/site-packages"
    assert ct.run("ls", site).stdout.split().count("mypy") == 0  # build-time only
    assert ct.run("readlink", "-f", "/usr/bin/saslauthd-oidc").stdout.startswith("/opt/venvs/")
    assert (
        ct.run("getent", "passwd", "saslauthd-oidc").stdout.split(":")[6].strip()
        == "/usr/sbin/nologin"
    )
    ct.run("getent", "group", "saslauthd-oidc-clients")
    assert ct.run("stat", "-c", "%a %U %G", CONF).stdout.split() == [
        "640",
        "root",
        "saslauthd-oidc",
    ]
    assert CONF in ct.run("dpkg-query", "-W", "-f=${Conffiles}", "saslauthd-oidc").stdout
    # The auth socket listens for Postfix; the service waits for a client.
    assert active(ct, "saslauthd-oidc.socket") == "active"
    assert ct.run("systemctl", "is-enabled", "saslauthd-oidc.socket").stdout.strip() == "enabled"
    assert active(ct, "saslauthd-oidc.service") == "inactive"
    assert ct.run("stat", "-c", "%a %U %G", AUTH).stdout.split() == [
        "660",
        "root",
        "saslauthd-oidc-clients",
    ]
    exec_start = ct.show("saslauthd-oidc.service", "ExecStart")["ExecStart"]
    assert "path=/usr/bin/saslauthd-oidc " in exec_start
    units = ct.run("systemctl", "cat", "saslauthd-oidc.service", "saslauthd-oidc.socket").stdout
    assert not [line for line in units.splitlines() if "/usr/local" in line.split("#")[0]]
    # Man pages: every command and key (tests/test_deb_manpages.py checks the generator).
    assert "check-config" in ct.sh("MANWIDTH=100 man saslauthd-oidc 2>/dev/null").stdout
    assert "auth_socket" in ct.sh("MANWIDTH=100 man saslauthd-oidc.toml 2>/dev/null").stdout
    assert ct.run("saslauthd-oidc", "check-config", check=False).returncode == 2


def test_unconfigured_and_broken_config_fail_once_with_the_key_then_restart_works(
    ct: Container,
) -> None:
    install(ct)
    # No Postfix on this host (an Exim or Cyrus host): the socket works all the same.
    assert ct.run("getent", "group", "postfix", check=False).returncode == 2
    assert active(ct, "saslauthd-oidc.socket") == "active"
    # A client connects while nothing is configured (the shipped file): it is
    # turned away (Postfix: 454, try again later), not kept waiting in a loop.
    ct.write("/root/token", "not-a-token\n")
    result = authenticate(ct)
    assert result["ok"] == 0 and result["dropped"] + result["refused"] == 1, result
    ct.wait_for("the service to fail", lambda: active(ct, "saslauthd-oidc.service") == "failed")
    # The sockets are stopped with it: nobody starts it again and again.
    ct.wait_for("the socket to stop", lambda: active(ct, "saslauthd-oidc.socket") == "inactive")
    assert authenticate(ct)["refused"] == 1
    time.sleep(3)  # long enough for a restart loop to show
    props = ct.show("saslauthd-oidc.service", "NRestarts", "Result", "StatusText", "ExecMainStatus")
    assert props["NRestarts"] == "0"
    assert props["ExecMainStatus"] == "2"
    assert props["StatusText"].startswith("config error: rule: ")
    assert "rule: at least one [[rule]] is needed" in status(ct, "saslauthd-oidc.service")
    starts = journal(ct, "saslauthd-oidc.service").count("Starting saslauthd-oidc.service")
    assert starts == 1, starts

    # Configured, restarted: the sockets come back without anything by hand.
    start_issuer(ct)
    configure(ct)
    ct.run("systemctl", "restart", "saslauthd-oidc")
    assert active(ct, "saslauthd-oidc.socket") == "active"
    assert authenticate(ct)["ok"] == 1

    # A key broken in the file: the restart fails at once, status names it.
    ct.sh(f"sed -i 's/^audiences = .*/audiences = 5/' {CONF}")
    assert ct.run("systemctl", "restart", "saslauthd-oidc", check=False).returncode != 0
    text = status(ct, "saslauthd-oidc.service")
    assert "rule[0].audiences" in text
    assert ct.show("saslauthd-oidc.service", "NRestarts")["NRestarts"] == "0"
    ct.sh(f"sed -i 's/^audiences = .*/audiences = [\"mail\"]/' {CONF}")
    ct.run("systemctl", "restart", "saslauthd-oidc")
    assert authenticate(ct)["ok"] == 1


def test_socket_activation_auth_reload_and_stop(ct: Container) -> None:
    install(ct)
    start_issuer(ct)
    configure(ct)
    # Socket activation: the first client starts the service.
    assert active(ct, "saslauthd-oidc.service") == "inactive"
    result = authenticate(ct)
    assert result == {
        "ok": 1,
        "fail": 0,
        "refused": 0,
        "dropped": 0,
        "errors": [],
        "replies": ["OK\t1\tuser=alice@example.org"],
    }
    assert active(ct, "saslauthd-oidc.service") == "active"
    pid = ct.show("saslauthd-oidc.service", "MainPID")["MainPID"]

    # A good reload: applied, same process.
    ct.sh(f'sed -i \'s/^name = "mail"/name = "mail-reloaded"/\' {CONF}')
    ct.run("systemctl", "reload", "saslauthd-oidc")
    assert ct.show("saslauthd-oidc.service", "MainPID")["MainPID"] == pid
    assert '"reloaded"' in journal(ct, "saslauthd-oidc.service")
    assert authenticate(ct)["ok"] == 1

    # A broken reload: systemctl reload fails naming the key; the old config serves.
    ct.sh(f"sed -i 's/^audiences = .*/audiences = 5/' {CONF}")
    reload = ct.run("systemctl", "reload", "saslauthd-oidc", check=False)
    assert reload.returncode != 0
    assert "rule[0].audiences" in journal(ct, "saslauthd-oidc.service")
    assert active(ct, "saslauthd-oidc.service") == "active"
    assert ct.show("saslauthd-oidc.service", "MainPID")["MainPID"] == pid
    assert authenticate(ct)["ok"] == 1

    # Refused by the daemon itself (the file was fine when checked, not when read):
    # the reload command waits for the daemon's own answer.
    ct.sh(f"sed -i 's/^audiences = .*/audiences = [\"mail\"]/' {CONF}")
    ct.run("systemctl", "reload", "saslauthd-oidc")

    # Stop: the service goes, the socket stays and starts it again.
    ct.run("systemctl", "stop", "saslauthd-oidc.service")
    assert active(ct, "saslauthd-oidc.service") == "inactive"
    assert active(ct, "saslauthd-oidc.socket") == "active"
    assert '"stopped"' in journal(ct, "saslauthd-oidc.service")
    assert authenticate(ct)["ok"] == 1
    assert ct.show("saslauthd-oidc.service", "MainPID")["MainPID"] != pid


def test_watchdog_pings_and_a_hung_daemon_is_restarted(ct: Container) -> None:
    install(ct)
    start_issuer(ct)
    configure(ct)
    dropin = "/run/systemd/system/saslauthd-oidc.service.d"
    ct.run("mkdir", "-p", dropin)
    ct.write(f"{dropin}/watchdog.conf", "[Service]\nWatchdogSec=2s\n")
    ct.run("systemctl", "daemon-reload")
    ct.run("systemctl", "start", "saslauthd-oidc")
    pid = ct.show("saslauthd-oidc.service", "MainPID")["MainPID"]
    time.sleep(5)  # > WatchdogSec: the pings keep it alive
    assert ct.show("saslauthd-oidc.service", "MainPID", "NRestarts") == {
        "MainPID": pid,
        "NRestarts": "0",
    }
    # Hung: no more pings. (No /bin/kill in a minimal image: procps.)
    ct.run("systemctl", "kill", "--kill-whom=main", "--signal=SIGSTOP", "saslauthd-oidc")
    ct.wait_for(
        "the watchdog restart",
        lambda: (
            ct.show("saslauthd-oidc.service", "NRestarts")["NRestarts"] == "1"
            and active(ct, "saslauthd-oidc.service") == "active"
        ),
        timeout=30,
    )
    assert "Watchdog timeout" in journal(ct, "saslauthd-oidc.service")
    assert authenticate(ct)["ok"] == 1


def test_upgrade_restarts_the_daemon_and_refuses_no_connection(ct: Container, debs: Debs) -> None:
    install(ct, "/srv/test/previous.deb")
    start_issuer(ct)
    configure(ct)
    assert authenticate(ct)["ok"] == 1
    pid = ct.show("saslauthd-oidc.service", "MainPID")["MainPID"]
    socket_since = ct.show("saslauthd-oidc.socket", "ActiveEnterTimestampMonotonic")
    # Clients authenticate in a loop, a new connection each time, during the upgrade.
    ct.run(
        "systemd-run",
        "--unit=test-client",
        "-p",
        "StandardOutput=file:/root/client.json",
        "python3",
        "/srv/test/client.py",
        AUTH,
        "/root/token",
        "alice@example.org",
        "--until",
        "/root/stop",
    )
    time.sleep(1)
    apt_install(ct, "/srv/test/current.deb")
    time.sleep(1)
    ct.run("touch", "/root/stop")
    ct.wait_for("the clients to finish", lambda: active(ct, "test-client.service") != "active")
    result = json.loads(ct.run("cat", "/root/client.json").stdout)
    # Nothing refused: the socket stayed open, new connections waited in its
    # backlog for the new daemon. (Connections the old daemon had accepted
    # but not answered when it stopped are closed: "dropped", a 454 for
    # Postfix; with this client's rate, a handful at most.)
    assert result["refused"] == 0 and result["fail"] == 0, result
    assert result["ok"] > 5
    assert result["dropped"] <= 3, result
    assert ct.run("dpkg-query", "-W", "-f=${Version}", "saslauthd-oidc").stdout == debs.version
    assert ct.show("saslauthd-oidc.service", "MainPID")["MainPID"] != pid  # restarted
    assert ct.show("saslauthd-oidc.socket", "ActiveEnterTimestampMonotonic") == socket_since
    assert 'name = "dev"' in ct.run("cat", CONF).stdout  # the edited conffile stays


def test_remove_keeps_the_config_purge_removes_it_and_the_user(ct: Container) -> None:
    install(ct)
    start_issuer(ct)
    configure(ct)
    assert authenticate(ct)["ok"] == 1
    ct.run("apt-get", "remove", "-y", "saslauthd-oidc")
    assert 'name = "dev"' in ct.run("cat", CONF).stdout
    assert ct.run("test", "-e", AUTH, check=False).returncode != 0
    assert active(ct, "saslauthd-oidc.service") != "active"
    ct.run("getent", "passwd", "saslauthd-oidc")
    ct.run("apt-get", "purge", "-y", "saslauthd-oidc")
    assert ct.run("test", "-e", "/etc/saslauthd-oidc", check=False).returncode != 0
    for database, name in (
        ("passwd", "saslauthd-oidc"),
        ("group", "saslauthd-oidc"),
        ("group", "saslauthd-oidc-clients"),
    ):
        assert ct.run("getent", database, name, check=False).returncode == 2, name


def test_http_socket_with_shipped_defaults_keeps_the_auth_socket_working(ct: Container) -> None:
    install(ct)
    start_issuer(ct)
    configure(ct)
    ct.run("systemctl", "enable", "--now", "saslauthd-oidc-http.socket")
    check = ct.run("saslauthd-oidc", "check-config", check=False)
    assert check.returncode == 2
    assert "http.auth" in check.stderr and "saslauthd-oidc-http.socket" in check.stderr
    ct.run("systemctl", "restart", "saslauthd-oidc")
    assert authenticate(ct)["ok"] == 1
    assert "http.auth" in ct.show("saslauthd-oidc.service", "StatusText")["StatusText"]
    for unit in ("saslauthd-oidc.socket", "saslauthd-oidc-http.socket"):
        assert active(ct, unit) == "active", unit
    code = ct.run(
        "python3",
        "-c",
        "import urllib.request, urllib.error\n"
        "try:\n"
        "    urllib.request.urlopen(urllib.request.Request('http://127.0.0.1:8480/introspect',"
        " data=b'token=x'), timeout=10)\n"
        "except urllib.error.HTTPError as e:\n"
        "    print(e.code)\n",
    ).stdout.strip()
    assert code == "401"
