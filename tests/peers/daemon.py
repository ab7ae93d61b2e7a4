"""``saslauthd-oidc serve`` as a subprocess, the way an administrator runs it.

Shared by the tests that put the daemon behind a real mail server: it starts
the daemon on a config file, waits until its auth socket accepts, reads its
JSON log, and stops it with SIGTERM.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import site
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from saslauthd_oidc.core.request import token_fingerprint
from tests.recipes import main_cf_settings, recipe

# The README's Postfix recipe (taken from README.md), as the tests with the
# unchrooted harness run it: smtpd_sasl_path is each test's own socket.
README_MAIN_CF = {
    k: v for k, v in main_cf_settings(recipe("postfix-main.cf")).items() if k != "smtpd_sasl_path"
}


def python_for(user: str) -> tuple[list[str], dict[str, str] | None]:
    """A Python command that ``user`` can run with this project importable.

    The test's own interpreter when ``user`` can run it; else (a pyenv
    interpreter under root's 0700 home, say) the system's ``python3`` of the
    same version with this venv's site-packages and the checkout on
    ``PYTHONPATH``. ``AssertionError`` when neither works.
    """
    probe = [sys.executable, "-c", "import saslauthd_oidc"]
    try:
        if subprocess.run(probe, user=user, check=False, capture_output=True).returncode == 0:
            return [sys.executable], None
    except PermissionError:
        pass  # the interpreter itself is out of the user's reach
    system = shutil.which(
        f"python{sys.version_info.major}.{sys.version_info.minor}", path="/usr/bin"
    )
    assert system is not None, f"no Python that user {user!r} can run"
    paths = [p for p in site.getsitepackages() if os.path.isdir(p)]
    repo = str(Path(__file__).resolve().parent.parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*paths, repo])}
    res = subprocess.run(
        [system, "-c", "import saslauthd_oidc"],
        user=user,
        env=env,
        check=False,
        capture_output=True,
    )
    assert res.returncode == 0, f"user {user!r} cannot import saslauthd_oidc: {res.stderr[-300:]!r}"
    return [system], env


class Daemon:
    """``saslauthd-oidc serve --config CONFIG``; ``stop()`` sends SIGTERM and returns the status."""

    def __init__(
        self,
        config: Path,
        socket_path: Path,
        log_path: Path,
        *,
        prefix: Sequence[str] = (),
        user: str | None = None,
        group: str | None = None,
        drop_to: tuple[str, str] | None = None,
    ) -> None:
        """``prefix`` goes before the command (e.g. ``systemd-socket-activate -l PATH``);
        ``user``/``group`` run it unprivileged, as the daemon's own system user would
        (with :func:`python_for` that user). ``drop_to=(user, group)`` instead runs
        ``prefix`` as root and only the daemon as that user (``setpriv``), the way
        systemd binds a socket unit's socket as root for an unprivileged service."""
        self.socket_path = socket_path
        self.log_path = log_path
        self._log = log_path.open("wb")
        python, env = python_for(user) if user is not None else ([sys.executable], None)
        if drop_to is not None:
            python, env = python_for(drop_to[0])
            drop = ["setpriv", f"--reuid={drop_to[0]}", f"--regid={drop_to[1]}", "--clear-groups"]
            # systemd-socket-activate passes no environment on: name it on the command
            pythonpath = [] if env is None else ["env", f"PYTHONPATH={env['PYTHONPATH']}"]
            python, env = [*drop, *pythonpath, *python], None
        self.proc = subprocess.Popen(
            [*prefix, *python, "-m", "saslauthd_oidc", "serve", "--config", str(config)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            user=user,
            group=group,
            extra_groups=[] if user is not None else None,
            env=env,
        )
        deadline = time.monotonic() + 20
        while not self._accepting():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"daemon did not start:\n{self.log()}")
            time.sleep(0.05)

    def _accepting(self) -> bool:
        if not self.socket_path.exists():
            return False
        with socket.socket(socket.AF_UNIX) as s:
            try:
                s.connect(str(self.socket_path))
            except OSError:
                return False
        return True

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_events(self) -> list[dict[str, object]]:
        return [json.loads(line) for line in self.log().splitlines() if line.startswith("{")]

    def events_for(self, token: str, *, timeout: float = 5.0) -> list[dict[str, object]]:
        """The "authentication" log lines for ``token``, waiting for the first to be written."""
        fp = token_fingerprint(token)
        deadline = time.monotonic() + timeout
        while True:
            mine = [
                e
                for e in self.log_events()
                if e.get("event") == "authentication" and e.get("token") == fp
            ]
            if mine or time.monotonic() > deadline:
                return mine
            time.sleep(0.05)

    def event(self, token: str) -> dict[str, object]:
        """The one "authentication" log line for ``token``."""
        mine = self.events_for(token)
        assert len(mine) == 1, self.log()
        return mine[0]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode
