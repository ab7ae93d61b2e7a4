"""Dev mode's Postfix lines: where the socket goes, and what it tells a normal user."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from saslauthd_oidc.tools import devmode
from saslauthd_oidc.tools.devmode import POSTFIX_DEV_SOCKET, dev_config, postfix_lines


def test_not_root_means_no_socket_in_postfix_queue(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert devmode.postfix_queue_socket() is None


def test_root_without_postfix_means_no_socket_in_postfix_queue(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    # postconf finds no main.cf here: no Postfix to serve
    monkeypatch.setenv("MAIL_CONFIG", str(tmp_path / "no-such-config"))
    assert devmode.postfix_queue_socket() is None


def test_queue_socket_config_is_for_group_postfix_only(tmp_path: Path) -> None:
    sock = tmp_path / "spool" / POSTFIX_DEV_SOCKET
    server = dev_config("http://127.0.0.1:1", tmp_path, sock)["server"]
    assert server["auth_socket"] == str(sock)
    assert (server["auth_socket_group"], server["auth_socket_mode"]) == ("postfix", "0660")
    # without it: the work directory, world-reachable as before
    assert dev_config("http://127.0.0.1:1", tmp_path)["server"]["auth_socket"] == str(
        tmp_path / "auth"
    )


def test_lines_for_the_queue_socket_are_relative() -> None:
    text = postfix_lines(f"/var/spool/postfix/{POSTFIX_DEV_SOCKET}", Path("/tmp/d/token"))
    assert f"smtpd_sasl_path = {POSTFIX_DEV_SOCKET}\n" in text
    assert "/var/spool/postfix/private" not in text.split("smtpd_sasl_path = ")[1].splitlines()[0]


def test_lines_for_a_tmp_socket_say_why_a_chrooted_smtpd_fails() -> None:
    text = postfix_lines("/tmp/saslauthd-oidc-dev/auth", Path("/tmp/saslauthd-oidc-dev/token"))
    assert "smtpd_sasl_path = /tmp/saslauthd-oidc-dev/auth\n" in text
    assert "NOT chrooted" in text
    assert "fatal: no SASL authentication mechanisms" in text
    assert "sudo scripts/dev" in text
