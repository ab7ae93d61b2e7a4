"""Mail Autoconfig, PACC, RFC 9728 and the RFC 7628 challenge name the same issuer.

A multi-IdP configuration (Kanidm with per-client issuers, an Authentik
per-application issuer, a Keycloak fallback) is walked endpoint by endpoint:
the engine's login decision and its failure challenge, the HTTP listener's
RFC 9728 metadata, autoconfig and PACC documents (through the ASGI app,
no server) must all name one issuer.
"""

from __future__ import annotations

import base64
import hashlib
import json
import tomllib
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
import structlog
import trio

from saslauthd_oidc.config import Config, ConfigError, parse_config
from saslauthd_oidc.core.autoconfig import (
    PACC_PATH,
    autoconfig_warnings,
    autoconfig_xml,
    domain_answers,
    pacc_json,
    pacc_txt_record,
)
from saslauthd_oidc.core.engine import Engine
from saslauthd_oidc.core.outcome import Reason, Refusal, Verdict
from saslauthd_oidc.core.request import AuthRequest, Credentials, Mechanism, RequestContext
from saslauthd_oidc.core.rules import config_warnings
from saslauthd_oidc.frontends.http import HttpFrontend
from saslauthd_oidc.frontends.http_callers import CallerAuth
from saslauthd_oidc.providers.jwt import UnverifiedToken, VerifiedClaims
from saslauthd_oidc.tools import cli

KANIDM_TB = "https://idm.example.org/oauth2/openid/thunderbird"
KANIDM_WEB = "https://idm.example.org/oauth2/openid/webmail"
AUTHENTIK = "https://auth.example.org/application/o/mail/"
KEYCLOAK = "https://sso.example.com/realms/mail"

MULTI_IDP = f"""
[server]
mechanisms = ["OAUTHBEARER", "XOAUTH2"]

[[provider]]
name = "kanidm-thunderbird"
issuer = "{KANIDM_TB}"

[[provider]]
name = "kanidm-webmail"
issuer = "{KANIDM_WEB}"

[[provider]]
name = "authentik-mail"
issuer = "{AUTHENTIK}"

[[provider]]
name = "keycloak-legacy"
issuer = "{KEYCLOAK}"

[[rule]]
name = "org-thunderbird"
provider = "kanidm-thunderbird"
audiences = ["thunderbird"]
domains = ["example.org"]
services = ["imap", "smtp", "pop3"]
required_scopes = ["email"]
challenge_scope = "openid email"
username = "{{email}}"

[[rule]]
name = "org-webmail"
provider = "kanidm-webmail"
audiences = ["webmail"]
domains = ["example.org"]
services = ["imap", "smtp"]
username = "{{email}}"

[[rule]]
name = "org-jmap"
provider = "kanidm-thunderbird"
audiences = ["thunderbird"]
domains = ["example.org"]
services = ["jmap"]
hosts = ["mail.example.org"]
resource_paths = ["/jmap/session"]
scopes_supported = ["openid", "email", "urn:ietf:params:oauth:scope:mail"]
username = "{{email}}"

[[rule]]
name = "net-authentik"
provider = "authentik-mail"
audiences = ["mail"]
domains = ["example.net"]
hosts = ["mail.example.net", "jmap.example.net"]
resource_paths = ["/jmap/session"]
username = "{{email}}"

[[rule]]
name = "legacy-keycloak"
provider = "keycloak-legacy"
audiences = ["mail"]
domains = ["example.com", "example.org"]
fallback = true
username = "{{email}}"

[[domain]]
name = "example.org"
display_name = "Example Org Mail"
client = "thunderbird"
imap = "imap.example.org:993"
submission = "smtp.example.org:465"
pop3 = "pop.example.org"
jmap = "https://mail.example.org/jmap/session"

[[domain]]
name = "example.net"
imap = "mail.example.net:993"
submission = "mail.example.net:587"
jmap = "https://jmap.example.net/jmap/session"
max_age = 600

[[domain]]
name = "example.com"
imap = "imap.example.com:143"

[[domain]]
name = "nobody.test"
imap = "imap.nobody.test:993"
"""

# (domain, client) -> the issuer every document must name for that client.
EXPECTED = {
    ("example.org", None): KANIDM_TB,  # the domain's client is thunderbird
    ("example.org", "thunderbird"): KANIDM_TB,
    ("example.net", None): AUTHENTIK,
    ("example.com", None): KEYCLOAK,
}
# The webmail client of the same Kanidm: its own issuer on IMAP and submission.
WEBMAIL = {"imap": KANIDM_WEB, "submission": KANIDM_WEB}
AUDIENCE = {KANIDM_TB: "thunderbird", KANIDM_WEB: "webmail", AUTHENTIK: "mail", KEYCLOAK: "mail"}


def multi_idp() -> Config:
    return parse_config(tomllib.loads(MULTI_IDP))


def b64(obj: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()


def jwt(**claims: Any) -> str:
    return f"{b64({'alg': 'ES256', 'typ': 'at+jwt'})}.{b64(claims)}.c2ln"


class IssuerVerifier:
    """Accepts the claims of tokens naming its issuer (signatures are not the point here)."""

    def __init__(self, issuer: str) -> None:
        self.issuer = issuer

    def verify_now(self, tok: str, unverified: UnverifiedToken | None) -> None:
        return None  # always the (async) verify: the engine's I/O step

    async def verify(self, tok: str, unverified: UnverifiedToken) -> VerifiedClaims | Refusal:
        if unverified.claims.get("iss") != self.issuer:
            return Refusal(Reason.WRONG_ISSUER, "iss")
        if unverified.claims.get("jti") == "expired":
            return Refusal(Reason.EXPIRED, "exp")
        return VerifiedClaims(dict(unverified.claims), dict(unverified.header), 2e9)

    async def userinfo(self, token: str) -> VerifiedClaims | Refusal:
        return Refusal(Reason.PROVIDER_UNAVAILABLE, "none here")


class Lookup:
    def __init__(self, cfg: Config) -> None:
        self.verifiers = {p.name: IssuerVerifier(p.issuer) for p in cfg.providers}

    def get(self, name: str) -> IssuerVerifier:
        return self.verifiers[name]


async def http_get(app: HttpFrontend, path: str, host: str, query: str = "") -> dict[str, Any]:
    """One GET through the ASGI app: status, headers (lower-case names) and body."""
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "GET",
        "path": path,
        "query_string": query.encode(),
        "headers": [(b"host", host.encode())],
        "client": ("192.0.2.10", 40000),
    }
    await app(scope, receive, send)  # type: ignore[arg-type]
    headers = {k.decode(): v.decode() for k, v in sent[0]["headers"]}
    return {"status": sent[0]["status"], "headers": headers, "body": sent[1]["body"]}


def frontend(cfg: Config) -> HttpFrontend:
    async def never(request: AuthRequest) -> Verdict:
        raise AssertionError("documents need no authentication")

    return HttpFrontend(cfg, never, CallerAuth(open=True))


def xml_issuer(body: bytes) -> str | None:
    root = ET.fromstring(body)
    issuer = root.find("oAuth2/issuer")
    return issuer.text if issuer is not None else None


# --------------------------------------------------------------------------- the five answers


def login(endpoint: Any, domain: str, tok: str) -> AuthRequest:
    return AuthRequest(
        Mechanism.OAUTHBEARER,
        Credentials(tok, f"alice@{domain}", endpoint.host, endpoint.port),
        RequestContext(
            service=endpoint.service,
            local_name=endpoint.host,
            local_port=endpoint.port,
            secured=True,
        ),
    )


def test_every_document_of_every_endpoint_names_the_same_issuer() -> None:
    cfg = multi_idp()
    engine = Engine(cfg, Lookup(cfg))  # type: ignore[arg-type]
    app = frontend(cfg)
    providers = {p.name: p for p in cfg.providers}
    checked = 0

    async def walk() -> None:
        nonlocal checked
        for (domain_name, client), expected in EXPECTED.items():
            domain = next(d for d in cfg.domains if d.name == domain_name)
            query = urlencode({"emailaddress": f"alice@{domain_name}"})
            # 4. autoconfig, 5. PACC (served only when the endpoints agree on one issuer)
            xml = await http_get(app, "/mail/config-v1.1.xml", f"autoconfig.{domain_name}", query)
            assert xml["status"] == 200
            assert xml_issuer(xml["body"]) == expected
            pacc = await http_get(app, PACC_PATH, f"ua-auto-config.{domain_name}")
            if domain_name == "example.com":  # IMAP on 143 only: nothing PACC can say
                assert pacc["status"] == 404
            else:
                assert pacc["status"] == 200
                authentication = json.loads(pacc["body"])["authentication"]
                assert authentication["oauth-public"]["issuer"] == expected
            for answer in domain_answers(cfg, domain, client):
                endpoint = answer.endpoint
                assert answer.issuer == expected, (domain_name, endpoint.protocol)
                if endpoint.protocol == "jmap":
                    # 3. RFC 9728 metadata for the session URL
                    prm = await http_get(
                        app, "/.well-known/oauth-protected-resource" + endpoint.path, endpoint.host
                    )
                    assert prm["status"] == 200
                    doc = json.loads(prm["body"])
                    assert doc["authorization_servers"] == [expected]
                    assert doc["resource"] == endpoint.url
                    context = RequestContext(
                        frontend="http", service="jmap", local_name=endpoint.host, secured=True
                    )
                else:
                    context = None
                # 1. the login decision for a token of that issuer's client
                tok = jwt(
                    iss=expected,
                    aud=AUDIENCE[expected],
                    email=f"alice@{domain_name}",
                    scope="openid email",
                )
                request = login(endpoint, domain_name, tok)
                if context is not None:
                    # A JMAP server hands over the bare token: no user, the account counts.
                    request = AuthRequest(Mechanism.BEARER, Credentials(tok), context)
                verdict = await engine.evaluate(request)
                assert verdict.account == f"alice@{domain_name}", (domain_name, endpoint, verdict)
                assert verdict.provider is not None
                assert providers[verdict.provider].issuer == expected
                if endpoint.protocol == "jmap":
                    checked += 1
                    continue
                # 2. the RFC 7628 challenge for a refused token of that issuer
                refused = jwt(iss=expected, aud=AUDIENCE[expected], jti="expired")
                verdict = await engine.evaluate(login(endpoint, domain_name, refused))
                assert verdict.reason is Reason.EXPIRED
                hint = verdict.hint.openid_configuration or ""
                assert hint.startswith(expected.rstrip("/") + "/.well-known/"), hint
                assert answer.challenge.openid_configuration == hint
                checked += 1

    trio.run(walk)
    assert checked == 12  # every endpoint of the three domains with rules (example.org twice)


def test_a_second_client_of_one_idp_is_told_its_own_issuer() -> None:
    cfg = multi_idp()
    engine = Engine(cfg, Lookup(cfg))  # type: ignore[arg-type]
    domain = cfg.domains[0]

    async def walk() -> None:
        for answer in domain_answers(cfg, domain, "webmail"):
            protocol = answer.endpoint.protocol
            if protocol not in WEBMAIL:
                continue
            assert answer.issuer == WEBMAIL[protocol]
            refused = jwt(iss=KANIDM_WEB, aud="webmail", jti="expired")
            verdict = await engine.evaluate(login(answer.endpoint, domain.name, refused))
            assert verdict.hint.openid_configuration == answer.challenge.openid_configuration
            assert (answer.challenge.openid_configuration or "").startswith(KANIDM_WEB)

    trio.run(walk)
    xml = autoconfig_xml(cfg, domain, "webmail")
    assert xml is not None
    # POP3 has no webmail rule and JMAP names thunderbird's issuer: they disagree,
    # so the document names no issuer and each endpoint tells its own.
    assert xml_issuer(xml) is None
    assert b"pop.example.org" not in xml


def test_a_domain_no_rule_accepts_gets_404_never_another_domains_idp() -> None:
    cfg = multi_idp()
    app = frontend(cfg)

    async def run() -> None:
        for path, host, query in (
            ("/mail/config-v1.1.xml", "autoconfig.nobody.test", ""),
            ("/.well-known/autoconfig/mail/config-v1.1.xml", "nobody.test", ""),
            (PACC_PATH, "ua-auto-config.nobody.test", ""),
            ("/mail/config-v1.1.xml", "autoconfig.example.org", "emailaddress=a%40nobody.test"),
            ("/mail/config-v1.1.xml", "autoconfig.example.org", "emailaddress=a%40unknown.test"),
            (PACC_PATH, "ua-auto-config.unknown.test", ""),
        ):
            reply = await http_get(app, path, host, query)
            assert reply["status"] == 404, (path, host, query)
            assert b"idm.example.org" not in reply["body"]
            assert reply["headers"]["cache-control"] == "no-store"

    trio.run(run)


# --------------------------------------------------------------------------- HTTP behaviour


def test_documents_are_cacheable_for_the_configured_lifetime() -> None:
    app = frontend(multi_idp())

    async def run() -> None:
        org = await http_get(app, "/.well-known/autoconfig/mail/config-v1.1.xml", "example.org")
        net = await http_get(app, PACC_PATH, "ua-auto-config.example.net")
        prm = await http_get(app, "/.well-known/oauth-protected-resource/jmap/session", "x")
        assert org["headers"]["cache-control"] == "public, max-age=3600"
        assert org["headers"]["content-type"].startswith("application/xml")
        assert net["headers"]["cache-control"] == "public, max-age=600"
        assert net["headers"]["content-type"] == "application/json"
        assert prm["headers"]["cache-control"] == "no-store"  # unchanged for the rest

    trio.run(run)


@pytest.mark.parametrize(
    "query",
    ["emailaddress=alice", "emailaddress=a%40b%40", "emailaddress=a%40x&emailaddress=b%40y"],
)
def test_a_malformed_address_is_400_and_not_reflected(query: str) -> None:
    app = frontend(multi_idp())
    reply = trio.run(http_get, app, "/mail/config-v1.1.xml", "autoconfig.example.org", query)
    assert reply["status"] == 400
    assert b"alice" not in reply["body"]


def test_the_address_is_never_logged_in_full() -> None:
    app = frontend(multi_idp())
    query = "emailaddress=secret.person%40example.org"
    with structlog.testing.capture_logs() as logs:
        trio.run(http_get, app, "/mail/config-v1.1.xml", "autoconfig.example.org", query)
        trio.run(
            http_get, app, "/mail/config-v1.1.xml", "autoconfig.example.org", "emailaddress=x%40y.z"
        )
    assert len(logs) == 2
    assert "secret.person" not in repr(logs)
    assert logs[0]["domain"] == "example.org"
    fingerprint = hashlib.sha256(b"secret.person@example.org").hexdigest()[:12]
    assert logs[0]["address"] == fingerprint
    assert logs[1]["domain"] == "y.z"


def test_request_headers_only_choose_among_configured_domains() -> None:
    app = frontend(multi_idp())

    async def run() -> None:
        one = await http_get(app, "/mail/config-v1.1.xml", "autoconfig.example.org")
        other = await http_get(app, "/mail/config-v1.1.xml", "autoconfig.example.net")
        # The address chooses the domain; what the Host says adds nothing to the body.
        chosen = await http_get(
            app, "/mail/config-v1.1.xml", "autoconfig.example.net", "emailaddress=a%40example.org"
        )
        assert chosen["body"] == one["body"] != other["body"]
        bad = await http_get(app, "/mail/config-v1.1.xml", "autoconfig.example.org@evil.test")
        assert bad["status"] == 400

    trio.run(run)


# --------------------------------------------------------------------------- document shapes

SOCKET_TYPES = {"SSL", "STARTTLS", "plain"}
AUTHENTICATIONS = {
    "password-cleartext",
    "password-encrypted",
    "NTLM",
    "GSSAPI",
    "client-IP-address",
    "TLS-client-cert",
    "OAuth2",
    "none",
}
SERVER_CHILDREN = ["hostname", "port", "socketType", "username", "authentication"]


def check_clientconfig(body: bytes) -> ET.Element:
    """The structure of draft-ietf-mailmaint-autoconfig-04 §4 / Thunderbird's config-v1.1."""
    assert body.startswith(b'<?xml version="1.0" encoding="UTF-8"?>')
    root = ET.fromstring(body)
    assert root.tag == "clientConfig" and root.get("version") == "1.1"
    providers = root.findall("emailProvider")
    assert len(providers) == 1
    provider = providers[0]
    assert provider.get("id")
    children = [c.tag for c in provider]
    assert children[:4] == ["domain", "displayName", "displayShortName", children[3]]
    assert provider.findtext("domain") == provider.get("id")
    servers = [c for c in provider if c.tag in ("incomingServer", "outgoingServer")]
    assert [c.tag for c in provider][3:] == [s.tag for s in servers]
    for server in servers:
        kind = server.get("type")
        if kind == "jmap":
            assert [c.tag for c in server] == ["url", "username", "authentication"]
            assert (server.findtext("url") or "").startswith("https://")
        else:
            assert kind in (("smtp",) if server.tag == "outgoingServer" else ("imap", "pop3"))
            assert [c.tag for c in server] == SERVER_CHILDREN
            assert 0 < int(server.findtext("port") or "0") < 65536
            assert server.findtext("socketType") in SOCKET_TYPES
        assert server.findtext("username") == "%EMAILADDRESS%"
        assert {a.text for a in server.findall("authentication")} <= AUTHENTICATIONS
        assert server.findtext("authentication") == "OAuth2"
    oauth = root.findall("oAuth2")
    assert len(oauth) <= 1
    if oauth:
        assert [c.tag for c in oauth[0]][:1] == ["issuer"]
        assert {c.tag for c in oauth[0]} <= {"issuer", "scope", "authURL", "tokenURL"}
    return root


def test_autoconfig_documents_have_the_drafts_structure() -> None:
    cfg = multi_idp()
    for domain in cfg.domains[:3]:
        body = autoconfig_xml(cfg, domain)
        assert body is not None
        check_clientconfig(body)
    root = check_clientconfig(autoconfig_xml(cfg, cfg.domains[1]) or b"")
    submission = root.find("emailProvider/outgoingServer")
    assert submission is not None
    assert (submission.findtext("port"), submission.findtext("socketType")) == ("587", "STARTTLS")
    org = check_clientconfig(autoconfig_xml(cfg, cfg.domains[0]) or b"")
    assert org.findtext("oAuth2/scope") == "email openid urn:ietf:params:oauth:scope:mail"
    assert org.findtext("emailProvider/displayName") == "Example Org Mail"
    pop = org.find("emailProvider/incomingServer[@type='pop3']")
    assert pop is not None and pop.findtext("port") == "995"


def test_xml_special_characters_in_names_are_escaped() -> None:
    data = tomllib.loads(MULTI_IDP)
    data["domain"][0]["display_name"] = 'Mail <&> "Org"'
    body = autoconfig_xml(parse_config(data), parse_config(data).domains[0])
    assert body is not None
    assert check_clientconfig(body).findtext("emailProvider/displayName") == 'Mail <&> "Org"'


def test_pacc_document_shape_and_its_dns_digest() -> None:
    cfg = multi_idp()
    org = pacc_json(cfg, cfg.domains[0])
    net = pacc_json(cfg, cfg.domains[1])
    assert org is not None and net is not None
    doc = json.loads(org)
    assert set(doc) == {"protocols", "authentication", "info"}
    assert doc["protocols"] == {
        "imap": {"host": "imap.example.org"},
        "submit": {"host": "smtp.example.org"},
        "pop3": {"host": "pop.example.org"},
        "jmap": {"url": "https://mail.example.org/jmap/session"},
    }
    assert doc["authentication"] == {"password": False, "oauth-public": {"issuer": KANIDM_TB}}
    assert doc["info"] == {"provider": {"name": "Example Org Mail"}}
    # Byte-stable: the DNS TXT digest vouches for these exact bytes.
    assert pacc_json(multi_idp(), multi_idp().domains[0]) == org
    assert org == json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    record = pacc_txt_record(org)
    assert record.startswith("v=UAAC1; a=sha256; d=")
    assert base64.b64decode(record.rsplit("d=", 1)[1]) == hashlib.sha256(org).digest()
    # Submission on 587 (STARTTLS) cannot be said in PACC: left out, not mislabelled.
    assert json.loads(net)["protocols"] == {
        "imap": {"host": "mail.example.net"},
        "jmap": {"url": "https://jmap.example.net/jmap/session"},
    }
    # example.com has only IMAP on 143 STARTTLS: nothing PACC can name.
    assert pacc_json(cfg, cfg.domains[2]) is None


# --------------------------------------------------------------------------- check-config


@pytest.mark.parametrize(
    ("change", "key", "words"),
    [
        ({"imap": "imap.example.org:1993"}, "domain[0].imap", "/tls"),
        ({"imap": "imap.example.org:99999"}, "domain[0].imap", "not a port"),
        ({"imap": "imap.example.org:993/ssl"}, "domain[0].imap", "/starttls"),
        ({"imap": "imap example.org"}, "domain[0].imap", "host[:port]"),
        ({"jmap": "http://mail.example.org/jmap"}, "domain[0].jmap", "https://"),
        ({"jmap": "https://mail.example.org/jmap?x=1"}, "domain[0].jmap", "query"),
        ({"name": "not a domain"}, "domain[0].name", "mail domain"),
        ({"max_age": -1}, "domain[0].max_age", "at least 0"),
        ({"imapp": "x"}, "domain[0].imapp", "imap"),
    ],
)
def test_domain_config_errors_name_the_key(change: dict[str, Any], key: str, words: str) -> None:
    data = tomllib.loads(MULTI_IDP)
    data["domain"][0].update(change)
    with pytest.raises(ConfigError) as caught:
        parse_config(data)
    assert caught.value.key == key
    assert words in str(caught.value)
    assert 'domain "example.org"' in str(caught.value) or change.get("name")


def test_duplicate_and_empty_domains_are_refused() -> None:
    data = tomllib.loads(MULTI_IDP)
    data["domain"][1]["name"] = "Example.ORG"
    with pytest.raises(ConfigError, match="duplicate domain"):
        parse_config(data)
    data = tomllib.loads(MULTI_IDP)
    data["domain"][1] = {"name": "example.net"}
    with pytest.raises(ConfigError, match="declares no endpoint") as caught:
        parse_config(data)
    assert caught.value.key == "domain[1]"


def test_check_config_reports_endpoints_without_issuer_or_that_disagree() -> None:
    cfg = multi_idp()
    warnings = autoconfig_warnings(cfg)
    assert warnings == [w for w in config_warnings(cfg) if w in warnings]
    text = "\n".join(warnings)
    assert "domain 'nobody.test' imap (imap.nobody.test:993): no rule accepts logins" in text
    assert "domain 'example.net' submission (mail.example.net:587): PACC names only" in text
    assert "example.org" not in text  # its every endpoint agrees
    data = tomllib.loads(MULTI_IDP)
    # A discovery_hint pointing at another IdP: the challenge would disagree.
    data["rule"][0]["discovery_hint"] = KEYCLOAK + "/.well-known/openid-configuration"
    # The JMAP rule loses its resource path: RFC 9728 names nobody for the session URL.
    data["rule"][3]["resource_paths"] = ["/jmap"]
    text = "\n".join(autoconfig_warnings(parse_config(data)))
    assert (
        "domain 'example.org' imap (imap.example.org:993): autoconfig and PACC name "
        f"{KANIDM_TB} (rule 'org-thunderbird') but the RFC 7628 challenge names {KEYCLOAK}"
    ) in text
    assert "domain 'example.net' jmap (https://jmap.example.net/jmap/session): no rule answers" in (
        text
    )


def test_check_config_prints_the_autoconfig_warnings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "c.toml"
    path.write_text(MULTI_IDP)
    assert cli.main(["check-config", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "warning: domain 'nobody.test' imap" in out


# --------------------------------------------------------------------------- discover


def test_discover_prints_what_each_document_says(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "c.toml"
    path.write_text(MULTI_IDP)
    assert cli.main(["discover", "--config", str(path), "alice@example.org"]) == 0
    out = capsys.readouterr().out
    assert "domain example.org (thunderbird)" in out
    assert f"rule org-thunderbird: issuer {KANIDM_TB}" in out
    assert (
        'WWW-Authenticate: Bearer resource_metadata="https://mail.example.org/.well-known/'
        'oauth-protected-resource/jmap/session"'
    ) in out
    body = pacc_json(multi_idp(), multi_idp().domains[0]) or b""
    assert f'_ua-auto-config.example.org. TXT "{pacc_txt_record(body)}"' in out
    assert "all documents agree" in out

    assert (
        cli.main(
            [
                "discover",
                "--config",
                str(path),
                "alice@example.org",
                "--client",
                "webmail",
                "--json",
            ]
        )
        == 1
    )
    report = json.loads(capsys.readouterr().out)
    imap = next(e for e in report["endpoints"] if e["protocol"] == "imap")
    assert imap["issuer"] == KANIDM_WEB and imap["rule"] == "org-webmail"
    assert report["autoconfig"]["issuer"] is None  # its endpoints disagree
    assert report["agree"] is False

    assert cli.main(["discover", "--config", str(path), "bob@nobody.test"]) == 1
    assert "no rule" in capsys.readouterr().out
    assert cli.main(["discover", "--config", str(path), "bob@elsewhere.test"]) == 1
    assert "every document answers 404" in capsys.readouterr().out
    assert cli.main(["discover", "--config", str(path), "not-an-address"]) == 2


def test_a_shared_jmap_host_never_gives_one_domain_anothers_idp() -> None:
    data = tomllib.loads(MULTI_IDP)
    # example.net's users are told the JMAP URL whose RFC 9728 rule is example.org's.
    data["domain"][1]["jmap"] = "https://mail.example.org/jmap/session"
    cfg = parse_config(data)
    net = cfg.domains[1]
    jmap = next(a for a in domain_answers(cfg, net) if a.endpoint.protocol == "jmap")
    assert jmap.rule is None and jmap.issuer is None
    xml = autoconfig_xml(cfg, net) or b""
    assert xml_issuer(xml) == AUTHENTIK
    assert b"mail.example.org" not in xml and KANIDM_TB.encode() not in xml
    assert "jmap" not in json.loads(pacc_json(cfg, net) or b"{}")["protocols"]
    assert (
        "domain 'example.net' jmap (https://mail.example.org/jmap/session): RFC 9728 names "
        f"{KANIDM_TB} (rule 'org-jmap') but no rule of that issuer accepts this domain's logins"
    ) in "\n".join(autoconfig_warnings(cfg))


def test_the_document_module_is_pure() -> None:
    """Sans-I/O: importing it pulls in no trio, httpx or hypercorn."""
    import subprocess
    import sys

    code = (
        "import sys, saslauthd_oidc.core.autoconfig; "
        "print(sorted(m for m in ('trio', 'httpx', 'hypercorn') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_rule_for_dovecots_passdb_oauth2_counts_for_its_imap_endpoint() -> None:
    """IMAP tokens may reach us as a bare token from Dovecot's passdb oauth2 (BEARER)."""
    data = tomllib.loads(MULTI_IDP)
    data["rule"][0]["mechanisms"] = ["BEARER"]
    data["rule"][1]["mechanisms"] = ["XOAUTH2"]
    cfg = parse_config(data)
    by_protocol = {a.endpoint.protocol: a for a in domain_answers(cfg, cfg.domains[0])}
    assert by_protocol["imap"].rule is not None
    assert by_protocol["imap"].rule.name == "org-thunderbird"
    webmail = {a.endpoint.protocol: a for a in domain_answers(cfg, cfg.domains[0], "webmail")}
    assert webmail["imap"].rule is not None and webmail["imap"].rule.name == "org-webmail"
    data["rule"][0]["mechanisms"] = ["PLAIN"]  # token as password: not a way OAuth clients log in
    cfg = parse_config(data)
    imap = next(a for a in domain_answers(cfg, cfg.domains[0]) if a.endpoint.protocol == "imap")
    assert imap.rule is None  # example.org's client is thunderbird: no other rule takes its tokens
    assert (
        "domain 'example.org' imap (imap.example.org:993): no rule accepts logins there "
        "(service 'imap', host, port, domain, client 'thunderbird')"
    ) in "\n".join(autoconfig_warnings(cfg))
