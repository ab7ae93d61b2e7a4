"""The README's nginx recipe for autoconfig, PACC and the JMAP 401, with Debian's nginx.

The ``<!-- recipe: nginx-autoconfig -->`` block is extracted from README.md
(so recipe and test cannot drift), its listen port, certificate and upstream
addresses replaced by loopback ones, and run by a private nginx (``-p``/``-c``,
never the system service) in front of the assembled daemon and a stand-in
JMAP server that answers 401 the way Stalwart does. A client then walks the
chain from an e-mail address: autoconfig, PACC, the JMAP session's 401 and
the RFC 9728 metadata it points at — all through nginx, all naming the
domain's issuer.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
import ssl
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import trio

from saslauthd_oidc.config import Config, parse_config
from saslauthd_oidc.core.autoconfig import pacc_json, pacc_txt_record, www_authenticate
from saslauthd_oidc.service.daemon import run_daemon
from saslauthd_oidc.tools.devissuer import DevIssuer
from tests.conftest import require_peer
from tests.peers.postfix import free_tcp_port
from tests.recipes import recipe, substitute
from tests.support import write_tls_files

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
# What the recipe says, and what the test puts in its place.
RECIPE_LISTEN = "listen 443 ssl;"
RECIPE_CERT = "/etc/ssl/certs/mail.example.org.pem"
RECIPE_KEY = "/etc/ssl/private/mail.example.org.key"
RECIPE_DAEMON = "http://127.0.0.1:8480"
RECIPE_JMAP = "http://127.0.0.1:8080"
# Stalwart's own challenge: relative, and naming itself.
STALWART_401 = (
    'Bearer realm="Stalwart Server", resource_metadata="/.well-known/oauth-protected-resource"'
)


def nginx_available() -> str | None:
    if NGINX is None:
        return "nginx is not installed (apt-get install nginx-light)"
    return None


@dataclass
class Chain:
    config: Config
    org: DevIssuer
    net: DevIssuer
    client: httpx.AsyncClient  # talks to nginx only


def daemon_config(tmp_path: Path, port: int, org: DevIssuer, net: DevIssuer) -> Config:
    return parse_config(
        {
            "server": {
                "auth_socket": str(tmp_path / "auth"),
                "http_listen": [f"127.0.0.1:{port}"],
            },
            "http": {"auth": "open"},
            "provider": [
                {"name": "org", "issuer": org.issuer, "allow_http": True},
                {"name": "net", "issuer": net.issuer, "allow_http": True},
            ],
            "rule": [
                {
                    "name": "org-jmap",
                    "provider": "org",
                    "audiences": ["mail"],
                    "domains": ["example.org"],
                    "hosts": ["mail.example.org"],
                    "resource_paths": ["/jmap/session"],
                },
                {
                    "name": "org",
                    "provider": "org",
                    "audiences": ["mail"],
                    "domains": ["example.org"],
                },
                {
                    "name": "net",
                    "provider": "net",
                    "audiences": ["mail"],
                    "domains": ["example.net"],
                },
            ],
            "domain": [
                {
                    "name": "example.org",
                    "imap": "imap.example.org:993",
                    "submission": "smtp.example.org:587",
                    "jmap": "https://mail.example.org/jmap/session",
                },
                {"name": "example.net", "imap": "mail.example.net:993"},
            ],
        }
    )


def nginx_conf(
    tmp_path: Path, site_recipe: str, nginx_port: int, daemon: int, jmap: int
) -> tuple[str, str]:
    """The private nginx's configuration around the recipe, and the CA file to trust."""
    ca, cert, key = write_tls_files(tmp_path)
    site = substitute(
        site_recipe,
        {
            RECIPE_LISTEN: f"listen 127.0.0.1:{nginx_port} ssl;",
            RECIPE_CERT: cert,
            RECIPE_KEY: key,
            RECIPE_DAEMON: f"http://127.0.0.1:{daemon}",
            RECIPE_JMAP: f"http://127.0.0.1:{jmap}",
        },
    )
    temp = {n: tmp_path / n for n in ("body", "proxy", "fastcgi", "uwsgi", "scgi")}
    for directory in temp.values():
        directory.mkdir()
    return (
        ca,
        f"""
daemon off;
master_process off;
pid {tmp_path}/nginx.pid;
error_log {tmp_path}/error.log notice;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {temp["body"]};
    proxy_temp_path {temp["proxy"]};
    fastcgi_temp_path {temp["fastcgi"]};
    uwsgi_temp_path {temp["uwsgi"]};
    scgi_temp_path {temp["scgi"]};

{site}

    # A stand-in JMAP server: 401 without a token, as Stalwart words it.
    server {{
        listen 127.0.0.1:{jmap};
        location / {{
            if ($http_authorization = "") {{
                add_header WWW-Authenticate '{STALWART_401}' always;
                return 401;
            }}
            return 200 '{{"capabilities":{{}}}}';
        }}
    }}
}}
""",
    )


async def wait_for_port(port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    with trio.fail_after(20):
        while True:
            if process.poll() is not None:
                pytest.fail(f"nginx exited: {log.read_text() if log.exists() else ''}")
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
            except OSError:
                await trio.sleep(0.05)
                continue
            await stream.aclose()
            return


@pytest.fixture
async def chain(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[Chain]:
    require_peer("nginx", nginx_available())
    assert NGINX is not None
    org, net = DevIssuer(algorithms=("ES256",)), DevIssuer(algorithms=("ES256",))
    for issuer in (org, net):
        await nursery.start(issuer.serve)
    daemon_port, nginx_port, jmap_port = free_tcp_port(), free_tcp_port(), free_tcp_port()
    config = daemon_config(tmp_path, daemon_port, org, net)
    await nursery.start(
        lambda task_status: run_daemon(config, task_status=task_status, handle_signals=False)
    )
    conf = tmp_path / "nginx.conf"
    ca, text = nginx_conf(tmp_path, recipe("nginx-autoconfig"), nginx_port, daemon_port, jmap_port)
    conf.write_text(text)
    error_log = tmp_path / "error.log"
    checked = subprocess.run(
        [NGINX, "-t", "-p", str(tmp_path), "-c", str(conf), "-e", str(error_log)],
        capture_output=True,
        check=False,
    )
    assert checked.returncode == 0, checked.stderr.decode()
    process = subprocess.Popen(
        [NGINX, "-p", str(tmp_path), "-c", str(conf), "-e", str(error_log)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        await wait_for_port(nginx_port, process, error_log)
        await wait_for_port(jmap_port, process, error_log)
        tls = ssl.create_default_context(cafile=ca)
        async with httpx.AsyncClient(
            base_url=f"https://127.0.0.1:{nginx_port}", verify=tls
        ) as client:
            yield Chain(config, org, net, client)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover - nginx ignores SIGTERM
            process.kill()
            process.wait()
        nursery.cancel_scope.cancel()


async def get(chain: Chain, url: str, host: str, **headers: str) -> httpx.Response:
    return await chain.client.get(url, headers={"Host": host, **headers})


def xml_issuer(body: bytes) -> str | None:
    return ET.fromstring(body).findtext("oAuth2/issuer")


async def test_a_client_from_an_address_reaches_the_domains_issuer(chain: Chain) -> None:
    org, net = chain.org.issuer, chain.net.issuer
    # Autoconfig: autoconfig.<domain> with the address, then the domain's well-known path.
    reply = await chain.client.get(
        "/mail/config-v1.1.xml",
        params={"emailaddress": "alice@example.org"},
        headers={"Host": "autoconfig.example.org"},
    )
    assert reply.status_code == 200
    assert xml_issuer(reply.content) == org
    assert reply.headers["cache-control"] == "public, max-age=3600"
    reply = await get(chain, "/.well-known/autoconfig/mail/config-v1.1.xml", "example.net")
    assert reply.status_code == 200
    assert xml_issuer(reply.content) == net
    # PACC: the bytes reach the client unchanged, so the DNS digest discover prints holds.
    reply = await get(
        chain, "/.well-known/user-agent-configuration.json", "ua-auto-config.example.org"
    )
    assert reply.status_code == 200
    assert json.loads(reply.content)["authentication"]["oauth-public"]["issuer"] == org
    domain = chain.config.domains[0]
    published = pacc_json(chain.config, domain)
    assert published is not None and reply.content == published
    digest = base64.b64decode(pacc_txt_record(published).rsplit("d=", 1)[1])
    assert hashlib.sha256(reply.content).digest() == digest
    # A domain nobody configured: 404, not example.org's IdP.
    reply = await get(chain, "/.well-known/autoconfig/mail/config-v1.1.xml", "example.com")
    assert reply.status_code == 404


async def test_the_jmap_401_points_at_metadata_naming_the_issuer(chain: Chain) -> None:
    domain = chain.config.domains[0]
    assert domain.jmap is not None
    session = urlsplit(domain.jmap.url or "")
    reply = await get(chain, session.path, "mail.example.org")
    assert reply.status_code == 401
    challenges = reply.headers.get_list("www-authenticate")
    # Exactly the challenge discover prints, and Stalwart's own one hidden.
    assert challenges == [www_authenticate(domain.jmap)]
    metadata = re.fullmatch(r'Bearer resource_metadata="([^"]+)"', challenges[0])
    assert metadata is not None
    url = urlsplit(metadata.group(1))
    assert (url.scheme, url.hostname) == ("https", "mail.example.org")
    reply = await get(chain, url.path, url.hostname or "")
    assert reply.status_code == 200
    document: dict[str, Any] = reply.json()
    assert document["resource"] == domain.jmap.url
    assert document["authorization_servers"] == [chain.org.issuer]
    # With a token the JMAP server answers, and nginx adds no challenge.
    reply = await get(chain, session.path, "mail.example.org", Authorization="Bearer x")
    assert reply.status_code == 200
    assert "www-authenticate" not in reply.headers
    # The mail host's own authorization-server metadata stays hidden.
    reply = await get(chain, "/.well-known/openid-configuration", "mail.example.org")
    assert reply.status_code == 404
