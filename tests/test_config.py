"""Config parsing: a valid file loads into frozen values; every error names its key."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from saslauthd_oidc.config import ConfigError, load_config, parse_config
from saslauthd_oidc.providers.issuers import accepts_issuer, tenant_of
from saslauthd_oidc.tools.cli import main

BASE: dict[str, Any] = {
    "provider": [{"name": "idp", "issuer": "https://idp.example.org/realms/mail"}],
    "rule": [{"name": "mail", "provider": "idp", "audiences": ["mail"]}],
}


def with_(section: str, **values: Any) -> dict[str, Any]:
    data = {k: (list(v) if isinstance(v, list) else v) for k, v in BASE.items()}
    if section in ("provider", "rule"):
        data[section] = [{**data[section][0], **values}]
    else:
        data[section] = values
    return data


def test_minimal_config_has_safe_defaults() -> None:
    cfg = parse_config(BASE)
    assert cfg.server.mechanisms == ("OAUTHBEARER", "XOAUTH2")
    assert cfg.server.auth_socket_mode == 0o660
    assert cfg.server.request_timeout == 5.0
    p = cfg.provider("idp")
    assert p.effective_discovery_url == (
        "https://idp.example.org/realms/mail/.well-known/openid-configuration"
    )
    assert "HS256" not in p.algorithms
    r = cfg.rules[0]
    assert (r.username, r.authzid, r.fallback) == ("{email}", "match", False)


def test_discovery_url_drops_trailing_slash_of_issuer() -> None:
    cfg = parse_config(with_("provider", issuer="https://ak.example.org/application/o/mail/"))
    assert cfg.provider("idp").effective_discovery_url == (
        "https://ak.example.org/application/o/mail/.well-known/openid-configuration"
    )


@pytest.mark.parametrize(
    ("data", "key", "fragment"),
    [
        (with_("rule", audiences=5), "rule[0].audiences", "list of non-empty strings"),
        (with_("rule", audiences=["ok", 3]), "rule[0].audiences", "list of non-empty strings"),
        (with_("rule", provider="nope"), "rule[0].provider", "no [[provider]] named 'nope'"),
        (with_("rule", username="plain"), "rule[0].username", "placeholder"),
        (with_("rule", username="{email|upper}"), "rule[0].username", "unknown filter 'upper'"),
        (with_("rule", username="{email"), "rule[0].username", "placeholder"),
        (with_("rule", ports=[0]), "rule[0].ports", "port numbers"),
        (with_("rule", authzid="maybe"), "rule[0].authzid", "'match', 'ignore'"),
        (with_("rule", audiencs=["x"]), "rule[0].audiencs", "unknown setting"),
        (
            with_("rule", remote_networks=["10.0.0.0/33"]),
            "rule[0].remote_networks",
            "not an address",
        ),
        (with_("rule", require_secured="yes"), "rule[0].require_secured", "true or false"),
        (with_("provider", issuer="http://idp.example.org"), "provider[0].issuer", "https://"),
        (with_("provider", algorithms=["HS256"]), "provider[0].algorithms", "hmac_secret_file"),
        (with_("provider", algorithms=["none"]), "provider[0].algorithms", "unsupported"),
        (with_("provider", leeway="60"), "provider[0].leeway", "expected a number"),
        (with_("provider", name="a b"), "provider[0].name", "letters"),
        (with_("server", request_timeout=12), "server.request_timeout", "below 10"),
        (with_("server", mechanisms=["CRAM-MD5"]), "server.mechanisms", "unknown mechanism"),
        (with_("server", auth_socket_mode=660), "server.auth_socket_mode", "octal"),
        (with_("server", tempfail="drop"), "server.tempfail", "expected one of"),
        (with_("logging", level="loud"), "logging.level", "expected one of"),
        ({**BASE, "rule": []}, "rule", "at least one"),
        ({**BASE, "rules": []}, "rules", "unknown setting"),
    ],
)
def test_errors_name_the_key(data: dict[str, Any], key: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    assert info.value.key == key
    assert str(info.value).startswith(f"{key}: ")
    assert fragment in str(info.value)


def test_duplicate_names_are_errors() -> None:
    data = {**BASE, "rule": BASE["rule"] * 2}
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    assert info.value.key == "rule[1].name"


def test_world_writable_config_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[[provider]]\nname="a"\nissuer="https://a.example"\n')
    os.chmod(path, 0o666)
    with pytest.raises(ConfigError, match="world-writable"):
        load_config(path)


def test_toml_syntax_error_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[server\n")
    with pytest.raises(ConfigError, match="TOML syntax error"):
        load_config(path)


def test_check_config_exits_2_naming_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        '[[provider]]\nname = "idp"\nissuer = "https://idp.example.org"\n'
        '[[rule]]\nprovider = "idp"\naudiences = "mail"\nusername = "{nope|shout}"\n'
    )
    assert main(["check-config", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "rule[0].username: unknown filter 'shout'" in err


def test_check_config_ok_prints_warnings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        '[[provider]]\nname = "idp"\nissuer = "https://idp.example.org"\n'
        '[[rule]]\nname = "any"\nprovider = "idp"\ncheck_audience = false\n'
        '[[rule]]\nname = "web"\nprovider = "idp"\naudiences = ["web"]\n'
    )
    assert main(["check-config", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "rule[1] (web) can never match" in out
    assert "rule[0] (any) checks no audience" in out


def test_example_config_in_etc_is_valid() -> None:
    cfg = load_config(Path(__file__).parent.parent / "etc" / "saslauthd-oidc.toml")
    assert cfg.rules and cfg.providers


# --------------------------------------------------------------------------- opaque tokens, tenants

ENTRA = "https://login.example.com/{tenantid}/v2.0"


@pytest.mark.parametrize(
    ("values", "key", "fragment"),
    [
        ({"client_id": "mail"}, "provider[0].client_secret_file", "client_id needs"),
        ({"client_secret_file": "/etc/s"}, "provider[0].client_id", "needs client_id"),
        (
            {"introspection_endpoint": "https://idp.example.org/introspect"},
            "provider[0].client_id",
            "introspection_endpoint needs client_id",
        ),
        (
            {
                "introspection_endpoint": "http://idp.example.org/introspect",
                "client_id": "mail",
                "client_secret_file": "/etc/s",
            },
            "provider[0].introspection_endpoint",
            "allow_http",
        ),
        (
            {"introspection_endpoint": "ftp://idp.example.org/introspect"},
            "provider[0].introspection_endpoint",
            "https://",
        ),
        (
            {"userinfo": True, "userinfo_endpoint": "http://idp.example.org/userinfo"},
            "provider[0].userinfo_endpoint",
            "allow_http",
        ),
        ({"introspection_endpoint": 5}, "provider[0].introspection_endpoint", ""),
        ({"client_id": ["mail"]}, "provider[0].client_id", ""),
        (
            {"client_id": "m", "client_secret_file": "/s", "introspection_auth": "private_key_jwt"},
            "provider[0].introspection_auth",
            "expected one of",
        ),
        ({"userinfo": "yes"}, "provider[0].userinfo", "true or false"),
        ({"issuer": ENTRA}, "provider[0].allowed_tenants", "{tenantid}"),
        ({"allowed_tenants": ["t1"]}, "provider[0].allowed_tenants", "only for an issuer"),
        (
            {"issuer": ENTRA, "allowed_tenants": ["not a tenant"]},
            "provider[0].allowed_tenants",
            "not a tenant id",
        ),
        ({"issuer": ENTRA, "allowed_tenants": [5]}, "provider[0].allowed_tenants", "list of"),
        (
            {"jwks_min_refresh": 4000, "jwks_refresh": 3600},
            "provider[0].jwks_min_refresh",
            "must not exceed jwks_refresh",
        ),
        ({"jwks_min_refresh": -1}, "provider[0].jwks_min_refresh", ""),
        ({"jwks_min_refresh": "60"}, "provider[0].jwks_min_refresh", "expected a number"),
    ],
)
def test_opaque_and_tenant_errors_name_the_key(
    values: dict[str, Any], key: str, fragment: str
) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(with_("provider", **values))
    assert info.value.key == key
    assert str(info.value).startswith(f"{key}: ")
    assert fragment in str(info.value)


def test_second_providers_error_names_its_index() -> None:
    data = {
        "provider": [BASE["provider"][0], {"name": "b", "issuer": "https://b.example.org"}],
        "rule": BASE["rule"],
    }
    data["provider"][1]["client_id"] = "mail"
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    assert info.value.key == "provider[1].client_secret_file"


def test_introspection_and_userinfo_settings_load() -> None:
    cfg = parse_config(
        with_(
            "provider",
            client_id="mail",
            client_secret_file="/etc/saslauthd-oidc/secret",
            introspection_endpoint="https://idp.example.org/introspect",
            introspection_auth="client_secret_post",
            userinfo=True,
            userinfo_endpoint="https://idp.example.org/userinfo",
            jwks_min_refresh=0,
            jwks_refresh=600,
        )
    )
    p = cfg.provider("idp")
    assert (p.client_id, p.client_secret_file) == ("mail", "/etc/saslauthd-oidc/secret")
    assert p.introspection_endpoint == "https://idp.example.org/introspect"
    assert p.introspection_auth == "client_secret_post"
    assert (p.userinfo, p.userinfo_endpoint) == (True, "https://idp.example.org/userinfo")
    assert (p.jwks_min_refresh, p.jwks_refresh) == (0.0, 600.0)
    assert p.introspects and p.validates_opaque


def test_opaque_defaults() -> None:
    p = parse_config(BASE).provider("idp")
    assert (p.client_id, p.introspection_endpoint, p.userinfo) == (None, None, False)
    assert p.introspection_auth == "client_secret_basic"
    assert p.jwks_min_refresh == 60.0
    assert not p.introspects and not p.validates_opaque and not p.multi_tenant


def test_http_endpoints_with_allow_http() -> None:
    cfg = parse_config(
        with_(
            "provider",
            issuer="http://idp.example.org",
            allow_http=True,
            client_id="mail",
            client_secret_file="/s",
            introspection_endpoint="http://idp.example.org/introspect",
        )
    )
    assert cfg.provider("idp").introspection_endpoint == "http://idp.example.org/introspect"


def test_tenant_template_loads() -> None:
    p = parse_config(
        with_(
            "provider", issuer=ENTRA, allowed_tenants=["T1", "9188040d-6c67-4c5b-b112-36a304b66dad"]
        )
    ).provider("idp")
    assert p.multi_tenant
    assert p.allowed_tenants == ("t1", "9188040d-6c67-4c5b-b112-36a304b66dad")
    assert p.effective_discovery_url == (
        "https://login.example.com/common/v2.0/.well-known/openid-configuration"
    )
    assert tenant_of(p, "https://login.example.com/t1/v2.0") == "t1"
    assert tenant_of(p, "https://login.example.com/T1/v2.0") == "T1"
    assert accepts_issuer(p, "https://login.example.com/9188040d-6c67-4c5b-b112-36a304b66dad/v2.0")
    for iss in (
        "https://login.example.com/t2/v2.0",
        "https://login.example.com//v2.0",
        "https://login.example.com/t1/x/v2.0",
        "https://login.example.com/t1/v2.0/",
        "https://login.example.com/t1.evil/v2.0",
        "https://login.example.com/t1/v2.0x",
        ENTRA,
        None,
        7,
    ):
        assert tenant_of(p, iss) is None, iss
        assert not accepts_issuer(p, iss), iss


def test_any_tenant() -> None:
    p = parse_config(with_("provider", issuer=ENTRA, allowed_tenants=["*"])).provider("idp")
    assert tenant_of(p, "https://login.example.com/contoso/v2.0") == "contoso"
    assert tenant_of(p, "https://login.example.com/a/b/v2.0") is None
    assert tenant_of(p, "https://login.example.com/" + "a" * 65 + "/v2.0") is None


def test_explicit_discovery_url_wins_for_tenant_template() -> None:
    p = parse_config(
        with_(
            "provider",
            issuer=ENTRA,
            allowed_tenants=["t1"],
            discovery_url="https://login.example.com/t1/v2.0/.well-known/openid-configuration",
        )
    ).provider("idp")
    assert p.effective_discovery_url.startswith("https://login.example.com/t1/")


# --------------------------------------------------------------------------- HTTP listener


def with_http(server: dict[str, Any], http: dict[str, Any] | None = None, **rule: Any) -> Any:
    data = {**BASE, "server": server, "rule": [{**BASE["rule"][0], **rule}]}
    if http is not None:
        data["http"] = http
    return data


def test_http_listener_is_off_by_default() -> None:
    cfg = parse_config(BASE)
    assert cfg.server.http_listen == ()
    assert cfg.server.http_socket is None
    assert cfg.http.auth == "required"


def test_http_listen_string_or_list() -> None:
    open_ = {"auth": "open"}
    cfg = parse_config(with_http({"http_listen": "127.0.0.1:8480"}, open_))
    assert cfg.server.http_listen == (("127.0.0.1", 8480),)
    cfg = parse_config(with_http({"http_listen": ["127.0.0.1:1", "[::1]:2"]}, open_))
    assert cfg.server.http_listen == (("127.0.0.1", 1), ("::1", 2))


@pytest.mark.parametrize(
    ("server", "http", "rule", "key", "fragment"),
    [
        ({"http_listen": "localhost:8480"}, {"auth": "open"}, {}, "server.http_listen", "IP"),
        ({"http_listen": "127.0.0.1"}, {"auth": "open"}, {}, "server.http_listen", "port"),
        ({"http_listen": "127.0.0.1:0"}, {"auth": "open"}, {}, "server.http_listen", "port"),
        ({"http_listen": "192.0.2.1:80"}, {"auth": "open"}, {}, "http.auth", "loopback"),
        ({"http_listen": "127.0.0.1:80"}, {}, {}, "http.auth", "users_file"),
        ({"http_socket": "/run/x"}, {"auth": "maybe"}, {}, "http.auth", "expected one of"),
        (
            {"http_socket": "/run/x", "http_socket_mode": "rw"},
            {"auth": "open"},
            {},
            "server.http_socket_mode",
            "octal",
        ),
        ({}, {"stalwart_issuer": "http://127.0.0.1:8480/"}, {}, "http.stalwart_issuer", "path"),
        ({}, {"stalwart_issuer": "ftp://x/s"}, {}, "http.stalwart_issuer", "URL"),
        ({}, {"readyz_grace": -1}, {}, "http.readyz_grace", "at least"),
        ({}, {"metric": True}, {}, "http.metric", "unknown"),
        ({}, None, {"resource_paths": ["jmap"]}, "rule[0].resource_paths", "starting with /"),
        ({}, None, {"referers": ["webmail.example.org"]}, "rule[0].referers", "URL"),
        ({}, None, {"mechanisms": ["BEARERX"]}, "rule[0].mechanisms", "unknown"),
    ],
)
def test_http_errors_name_the_key(
    server: dict[str, Any],
    http: dict[str, Any] | None,
    rule: dict[str, Any],
    key: str,
    fragment: str,
) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(with_http(server, http, **rule))
    assert info.value.key == key
    assert fragment in info.value.message


def test_open_is_fine_on_unix_sockets_and_loopback() -> None:
    cfg = parse_config(
        with_http(
            {"http_socket": "/run/x", "http_listen": ["127.0.0.1:1", "[::1]:2"]},
            {"auth": "open"},
            mechanisms=["BEARER"],
            resource_paths=["/jmap/"],
        )
    )
    assert cfg.http.auth == "open"
    assert cfg.rules[0].mechanisms == ("BEARER",)
    assert cfg.rules[0].resource_paths == ("/jmap",)
    assert cfg.http.stalwart_path is None


def test_check_config_reads_the_http_credential_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    users = tmp_path / "users"
    users.write_text("dovecot:secret\n")
    users.chmod(0o644)
    path = tmp_path / "c.toml"
    path.write_text(
        '[server]\nhttp_listen = "127.0.0.1:8480"\n'
        f'[http]\nusers_file = "{users}"\n'
        '[[provider]]\nname = "idp"\nissuer = "https://idp.example.org"\n'
        '[[rule]]\nprovider = "idp"\naudiences = ["mail"]\n'
    )
    assert main(["check-config", "--config", str(path)]) == 2
    assert "http.users_file" in capsys.readouterr().err
    users.chmod(0o600)
    assert main(["check-config", "--config", str(path)]) == 0
