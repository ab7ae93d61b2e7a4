"""What ``serve`` loads at start-up: no HTTP server and no Prometheus library until used.

hypercorn is imported where HTTP is served, prometheus_client at the first
scrape; each costs megabytes of resident memory in every worker otherwise.
"""

from __future__ import annotations

import json
import subprocess
import sys

from prometheus_client.core import GaugeMetricFamily, Metric

from saslauthd_oidc.core.outcome import Reason, Verdict
from saslauthd_oidc.core.request import AuthRequest, Credentials, Mechanism, RequestContext
from saslauthd_oidc.service.metrics import Metrics

_LAZY = ("hypercorn", "h2", "wsproto", "prometheus_client")


def _modules_after(*imports: str) -> set[str]:
    code = "import sys, json\n"
    code += "".join(f"import {name}\n" for name in imports)
    code += "print(json.dumps(sorted(sys.modules)))\n"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    return set(json.loads(out.stdout))


def _loaded(modules: set[str], package: str) -> list[str]:
    return sorted(m for m in modules if m == package or m.startswith(package + "."))


def test_serve_imports_no_http_server_and_no_prometheus() -> None:
    # The command line (``python -m saslauthd_oidc serve``), the daemon and its workers.
    modules = _modules_after(
        "saslauthd_oidc.tools.cli",
        "saslauthd_oidc.service.daemon",
        "saslauthd_oidc.service.workers",
    )
    assert "saslauthd_oidc.service.daemon" in modules  # the check itself imported something
    for package in _LAZY:
        assert _loaded(modules, package) == [], package


def test_the_http_frontend_module_does_not_load_hypercorn_until_it_serves() -> None:
    modules = _modules_after("saslauthd_oidc.frontends.http", "saslauthd_oidc.tools.devissuer")
    assert _loaded(modules, "hypercorn") == []


def test_metrics_render_loads_prometheus_and_counts_what_was_observed() -> None:
    metrics = Metrics()
    req = AuthRequest(Mechanism.OAUTHBEARER, Credentials("t", None), RequestContext())
    metrics.observe(req, Verdict(reason=Reason.OK, account="a", rule="web"), 0.002)

    class Extra:
        def collect(self) -> list[Metric]:
            return [GaugeMetricFamily("extra_gauge", "registered after start", value=7)]

    metrics.register(Extra())
    body, content_type = metrics.render()
    text = body.decode()
    assert content_type.startswith("text/plain")
    assert (
        'saslauthd_oidc_authentications_total{frontend="dovecot",mechanism="OAUTHBEARER",'
        'outcome="ok",reason="ok",rule="web"} 1.0'
    ) in text
    assert "extra_gauge 7.0" in text

    class Later:
        def collect(self) -> list[Metric]:
            return [GaugeMetricFamily("later_gauge", "registered after a scrape", value=1)]

    metrics.register(Later())
    assert "later_gauge 1.0" in metrics.render()[0].decode()
