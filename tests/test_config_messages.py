"""Config errors an admin can act on: the key, the rule by its name, the file's line, a fix.

Each broken configuration goes through the command line (``check-config``) as
an admin meets it, checking the exit status and the message.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from saslauthd_oidc.config import KeyLines, load_config
from saslauthd_oidc.tools.cli import main

PROVIDER = '[[provider]]\nname = "idp"\nissuer = "https://idp.example.org"\n'


def check(tmp_path: Path, text: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    path = tmp_path / "saslauthd-oidc.toml"
    path.write_text(text)
    code = main(["check-config", "--config", str(path)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def line_of(text: str, needle: str) -> int:
    return next(n for n, line in enumerate(text.splitlines(), 1) if needle in line)


def test_second_rules_misspelt_key_names_rule_line_and_suggestion(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = (
        PROVIDER
        + '\n[[rule]]\nname = "webmail"\nprovider = "idp"\naudiences = [\n  "webmail",\n]\n'
        + '\n[[rule]]\nname = "thunderbird"\nprovider = "idp"\naudience = ["thunderbird"]\n'
    )
    code, out, err = check(tmp_path, text, capsys)
    assert code == 2 and out == ""
    assert "rule[1].audience: unknown setting" in err
    assert 'did you mean "audiences"?' in err
    assert 'rule "thunderbird"' in err
    assert f"line {line_of(text, 'audience = ')}" in err
    assert "Traceback" not in err


def test_misspelt_section_is_reported_as_itself(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = (
        '[server]\nhttp_listen = "127.0.0.1:8480"\n\n[htttp]\nauth = "open"\n\n'
        + PROVIDER
        + '[[rule]]\nprovider = "idp"\naudiences = ["mail"]\n'
    )
    code, _, err = check(tmp_path, text, capsys)
    assert code == 2
    assert "htttp: unknown section [htttp]" in err and "did you mean [http]?" in err
    assert f"line {line_of(text, '[htttp]')}" in err
    assert "http.auth" not in err


def test_misspelt_array_section(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = PROVIDER + '[[rules]]\nprovider = "idp"\naudiences = ["mail"]\n'
    code, _, err = check(tmp_path, text, capsys)
    assert code == 2
    assert "unknown section [[rules]]" in err and "did you mean [[rule]]?" in err


def test_leading_zero_mode_says_how_to_write_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = check(tmp_path, "[server]\nauth_socket_mode = 0660\n", capsys)
    assert code == 2
    assert "server.auth_socket_mode:" in err
    assert 'auth_socket_mode = "0660"' in err and "0o660" in err
    assert "line 2" in err


def test_octal_literal_mode_is_what_it_says(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        "[server]\nauth_socket_mode = 0o640  # rw-r-----\n"
        + PROVIDER
        + '[[rule]]\nprovider = "idp"\naudiences = ["mail"]\n'
    )
    assert load_config(path).server.auth_socket_mode == 0o640


def test_decimal_mode_is_refused_with_the_fix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = check(tmp_path, "[server]\nauth_socket_mode = 660\n" + PROVIDER, capsys)
    assert code == 2
    assert "server.auth_socket_mode" in err and '"0660"' in err and "decimal" in err


def test_unknown_algorithm_lists_the_supported_ones(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = (
        '[[provider]]\nname = "kanidm"\nissuer = "https://idm.example.org/oauth2/openid/mail"\n'
        'algorithms = ["ES256", "RS265"]\n[[rule]]\nprovider = "kanidm"\naudiences = ["mail"]\n'
    )
    code, _, err = check(tmp_path, text, capsys)
    assert code == 2
    assert "provider[0].algorithms: unsupported algorithm 'RS265'" in err
    assert "did you mean 'RS256'?" in err
    for alg in ("ES256", "ES384", "PS256", "RS256", "EdDSA", "HS256"):
        assert alg in err
    assert 'provider "kanidm"' in err and "line 4" in err


@pytest.mark.parametrize(
    ("key", "value", "fix"),
    [
        ("audiences", '"mail"', 'audiences = ["mail"]'),
        ("required_scopes", '"openid email"', 'required_scopes = ["openid", "email"]'),
        ("hosts", '"a.example, b.example"', 'hosts = ["a.example", "b.example"]'),
    ],
)
def test_a_string_where_a_list_is_expected_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], key: str, value: str, fix: str
) -> None:
    text = PROVIDER + f'[[rule]]\nname = "mail"\nprovider = "idp"\n{key} = {value}\n'
    code, _, err = check(tmp_path, text, capsys)
    assert code == 2
    assert f"rule[0].{key}: expected a list of non-empty strings, not a string" in err
    assert fix in err


def test_http_listen_may_be_one_string(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        '[server]\nhttp_listen = "127.0.0.1:8480"\n[http]\nauth = "open"\n'
        + PROVIDER
        + '[[rule]]\nprovider = "idp"\naudiences = ["mail"]\n'
    )
    assert load_config(path).server.http_listen == (("127.0.0.1", 8480),)


def test_misspelt_claim_in_username_is_a_warning_with_a_suggestion(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = (
        PROVIDER
        + '[[rule]]\nname = "mail"\nprovider = "idp"\naudiences = ["mail"]\nusername = "{emial}"\n'
        + '[[rule]]\nname = "custom"\nprovider = "idp"\naudiences = ["x"]\n'
        + 'username = "{mail_account}"\n'
    )
    code, out, _ = check(tmp_path, text, capsys)
    assert code == 0
    assert "warning: rule[0] (mail).username: {emial}" in out and "did you mean {email}?" in out
    [custom] = [line for line in out.splitlines() if "{mail_account}" in line]
    assert "make sure your IdP adds it" in custom and "did you mean" not in custom
    assert "{email}" not in out.replace("did you mean {email}?", "")  # known claims: no warning


def test_unnamed_rule_error_has_no_label_but_a_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = PROVIDER + '[[rule]]\nprovider = "idp"\naudiences = ["mail"]\nport = [587]\n'
    code, _, err = check(tmp_path, text, capsys)
    assert code == 2
    assert 'rule[0].port: unknown setting (misspelt?); did you mean "ports"?' in err
    assert "rule[0].port" in err and f"line {line_of(text, 'port =')}" in err


def test_key_lines_scan() -> None:
    text = """# comment [[rule]]
[server]
auth_socket = "/run/x"   # [not a table]
mechanisms = [
  "OAUTHBEARER",
  # name = "inside an array"
]

[[provider]]
name = "a"
"quoted key" = 1

[[rule]]
name = "one"
doc = '''
name = "inside a string"
'''
claims = { groups = "mail" }

[[rule]]
name = "two"

[rule.claims]
groups = "x"
"""
    lines = KeyLines(text)
    assert lines.find("server.auth_socket") == 3
    assert lines.find("server.mechanisms") == 4
    assert lines.find("provider[0].name") == 10
    assert lines.find("provider[0].quoted key") == 11
    assert lines.find("rule[0].name") == 14
    assert lines.find("rule[0].claims") == 18
    assert lines.find("rule[1].name") == 21
    assert lines.find("rule[1].claims.groups") == 24
    assert lines.find("rule[1].claims") == 23
    assert lines.find("rule[1].audiences") == 20  # missing key: its table
    assert lines.find("cache.ttl") is None


def test_misspelt_provider_name_is_suggested(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = (
        '[[provider]]\nname = "kanidm-webmail"\nissuer = "https://idm.example.org/x"\n'
        '[[rule]]\nname = "web"\nprovider = "kanidm-webmial"\naudiences = ["webmail"]\n'
    )
    code, _, err = check(tmp_path, text, capsys)
    assert code == 2
    assert "rule[0].provider: no [[provider]] named 'kanidm-webmial'" in err
    assert "did you mean 'kanidm-webmail'?" in err and 'rule "web"' in err and "line 6" in err


@pytest.mark.parametrize(
    ("line", "fix"),
    [
        ("audiences = [mail, web]", 'audiences = ["mail", "web"]'),
        ("username = email", 'username = "email"'),
    ],
)
def test_unquoted_strings_get_the_quoted_form(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], line: str, fix: str
) -> None:
    text = PROVIDER + f'[[rule]]\nprovider = "idp"\n{line}\n'
    code, _, err = check(tmp_path, text, capsys)
    assert code == 2
    assert "TOML syntax error" in err and f"TOML strings need quotes: {fix}" in err
    assert "line 6" in err
