"""contrib/prometheus and contrib/grafana: valid, and only about metrics the daemon exports.

The rules are checked with ``promtool check rules`` (Debian: prometheus).
Every ``saslauthd_oidc_*`` name and every label they select on must be one
that a real daemon's ``GET /metrics`` shows after real authentications, so
that a renamed metric breaks this test instead of silently muting an alert.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from saslauthd_oidc.config import parse_config
from saslauthd_oidc.service.daemon import run_daemon
from saslauthd_oidc.tools.devissuer import DevIssuer
from tests.conftest import require_peer

CONTRIB = Path(__file__).resolve().parents[1] / "contrib"
RULES = CONTRIB / "prometheus" / "saslauthd-oidc.rules.yml"
DASHBOARD = CONTRIB / "grafana" / "saslauthd-oidc.json"
FORM = {"content-type": "application/x-www-form-urlencoded"}
# name{label="..."} / name{label=~"..."} / name{label!="..."}
SELECTOR = re.compile(r"\b(saslauthd_oidc_[a-z0-9_]+)(\{[^}]*\})?")
LABEL = re.compile(r"([a-z_]+)\s*(?:=~|!=|!~|=)")


def rule_expressions() -> list[str]:
    exprs = re.findall(
        r"^\s+expr:\s*(?:>-\s*)?(.*?)(?=^\s+(?:for|labels|annotations):)",
        RULES.read_text(),
        re.M | re.S,
    )
    assert exprs, "no expr found in the rules file"
    return exprs


def dashboard_expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        if variable.get("definition"):
            exprs.append(variable["definition"])
    assert exprs
    return exprs


def used(exprs: list[str]) -> dict[str, set[str]]:
    """Metric name -> the label names selected on."""
    found: dict[str, set[str]] = {}
    for expr in exprs:
        for name, selector in SELECTOR.findall(expr):
            labels = found.setdefault(name, set())
            if selector:
                labels.update(LABEL.findall(selector))
    return found


def test_promtool_accepts_the_rules() -> None:
    promtool = shutil.which("promtool")
    require_peer("promtool", None if promtool else "not installed (Debian: prometheus)")
    assert promtool
    result = subprocess.run(
        [promtool, "check", "rules", str(RULES)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_dashboard_is_grafana_json_with_a_datasource_variable() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "saslauthd-oidc"
    names = {v["name"] for v in dashboard["templating"]["list"]}
    assert "datasource" in names
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]


@pytest.fixture
async def scraped(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[dict[str, set[str]]]:
    """What a real daemon exports after accepted, refused and cached authentications."""
    issuer = DevIssuer()
    await nursery.start(issuer.serve)
    assert issuer.issuer
    sock = tmp_path / "http"
    config = parse_config(
        {
            "server": {"auth_socket": "", "http_socket": str(sock), "request_timeout": 2.0},
            "http": {"auth": "open"},
            "provider": [{"name": "dev", "issuer": issuer.issuer, "allow_http": True}],
            "rule": [{"name": "mail", "provider": "dev", "audiences": ["mail"]}],
        }
    )
    await nursery.start(
        lambda task_status: run_daemon(config, task_status=task_status, handle_signals=False)
    )
    transport = httpx.AsyncHTTPTransport(uds=str(sock))
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
        token = issuer.mint()
        for t in (token, token, issuer.mint(audience="other"), "not-a-token"):
            reply = await client.post("/introspect", content=f"token={t}", headers=FORM)
            assert reply.status_code == 200
        metrics = await client.get("/metrics")
        assert metrics.status_code == 200
    exported: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(metrics.text):
        for sample in family.samples:
            exported.setdefault(sample.name, set()).update(sample.labels)
    yield exported
    nursery.cancel_scope.cancel()


@pytest.mark.parametrize("source", ["prometheus rules", "grafana dashboard"])
async def test_every_metric_and_label_used_is_exported(
    scraped: dict[str, set[str]], source: str
) -> None:
    wanted = used(rule_expressions() if source == "prometheus rules" else dashboard_expressions())
    assert wanted
    missing = sorted(set(wanted) - set(scraped))
    assert not missing, f"{source} use metrics the daemon does not export: {missing}"
    for name, labels in wanted.items():
        unknown = labels - scraped[name] - {"instance", "job"}
        assert not unknown, f"{source}: {name} has no label(s) {sorted(unknown)}"


def test_the_expression_reader_finds_names_and_labels() -> None:
    """The checks above are only as good as this reader."""
    found = used(
        ['sum(rate(saslauthd_oidc_x_total{outcome="fail",reason=~"a|b"}[5m])) / saslauthd_oidc_y']
    )
    assert found == {"saslauthd_oidc_x_total": {"outcome", "reason"}, "saslauthd_oidc_y": set()}
    rules = used(rule_expressions())
    assert {"saslauthd_oidc_authentications_total", "saslauthd_oidc_provider_keys_loaded"} <= set(
        rules
    )
