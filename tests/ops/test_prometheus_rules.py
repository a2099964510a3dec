"""config/prometheus: the rules and the scrape config, proven with the real promtool."""

from __future__ import annotations

import re
from typing import Any

from tests.ops.promql import (
    DESIGN_METRICS,
    PROMETHEUS_DIR,
    RULES,
    RULES_TEST,
    SCRAPE_CONFIG,
    load_yaml,
    metric_names,
    require_tool,
    run,
)

REQUIRED_ALERTS = {
    "PassguardDown",
    "PassguardNotScraping",
    "PassguardTargetsStale",
    "PassthroughCircuitBreakerOverflow",
    "PassthroughTrafficBlocked",
    "PassguardAuditPrunedBySize",
    "PassguardShadowWouldBlock",
    "PassguardAuditWriteFailing",
    "PassguardKumaDiscoveryDown",
    "PassguardPrometheusSourceDown",
    "PassguardConfigReloadFailed",
    "PassguardTLSCertificateReloadFailed",
    "PassguardScrapeWorkerRestarting",
}
RUNBOOKS = PROMETHEUS_DIR.parent.parent / "docs" / "runbooks.md"
SEVERITIES = {"critical", "warning", "info"}
# level:metric:operations (https://prometheus.io/docs/practices/rules/)
RECORD_NAME = re.compile(r"^[a-z][a-z_]*:[a-z][a-z0-9_]*:[a-z][a-z0-9_]*$")


def rules() -> list[dict[str, Any]]:
    document = load_yaml(RULES)
    return [rule for group in document["groups"] for rule in group["rules"]]


def alerts() -> dict[str, dict[str, Any]]:
    return {rule["alert"]: rule for rule in rules() if "alert" in rule}


def test_promtool_check_rules() -> None:
    promtool = require_tool("promtool")
    result = run([promtool, "check", "rules", str(RULES)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_test_rules() -> None:
    promtool = require_tool("promtool")
    result = run([promtool, "test", "rules", RULES_TEST.name], cwd=PROMETHEUS_DIR)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout
    assert "FAILED" not in result.stdout


def test_promtool_check_scrape_config() -> None:
    promtool = require_tool("promtool")
    result = run([promtool, "check", "config", SCRAPE_CONFIG.name], cwd=PROMETHEUS_DIR)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "is valid prometheus config file" in result.stdout
    config = load_yaml(SCRAPE_CONFIG)
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["passguard"]["static_configs"][0]["targets"] == ["127.0.0.1:9110"]
    assert "passguard-agent" in jobs


def test_the_required_alerts_exist() -> None:
    assert alerts().keys() >= REQUIRED_ALERTS


def test_every_alert_has_severity_summary_description_and_for() -> None:
    for name, rule in alerts().items():
        assert rule.get("labels", {}).get("severity") in SEVERITIES, name
        annotations = rule.get("annotations", {})
        assert annotations.get("summary"), name
        assert annotations.get("description"), name
        assert "for" in rule, f"{name} has no for:"


def test_overflow_alert_mentions_the_default_thresholds() -> None:
    description = alerts()["PassthroughCircuitBreakerOverflow"]["annotations"]["description"]
    assert "1024" in description


def test_recording_rules_follow_the_naming_convention() -> None:
    records = [rule for rule in rules() if "record" in rule]
    assert records
    for rule in records:
        name = rule["record"]
        assert RECORD_NAME.match(name), name
        # rate() of a counter drops the _total suffix
        assert "_total" not in name, name
    names = {rule["record"] for rule in records}
    assert "mesh_service:passguard_passthrough_connections:rate5m" in names


def test_rules_only_read_metrics_passguard_exports() -> None:
    for rule in rules():
        used = metric_names(rule["expr"])
        unknown = used - DESIGN_METRICS
        assert not unknown, f"{rule.get('alert') or rule.get('record')}: {unknown}"


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    fires: set[str] = set()
    quiet: set[str] = set()
    for case in load_yaml(RULES_TEST)["tests"]:
        for check in case.get("alert_rule_test", []):
            (fires if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = set(alerts())
    assert names - fires == set(), "alerts never shown firing"
    assert names - quiet == set(), "alerts never shown quiet"


def test_every_alert_links_its_section_of_the_runbooks() -> None:
    """runbook_url is docs/runbooks.md#<alert in lower case>, and that
    section exists with the three parts an on-call engineer looks for."""
    text = RUNBOOKS.read_text(encoding="utf-8")
    sections = {m.group(1): m.start() for m in re.finditer(r"^## (\w+)$", text, re.M)}
    for name, rule in alerts().items():
        assert rule["annotations"].get("runbook_url") == \
            f"docs/runbooks.md#{name.lower()}", name
        assert name in sections, f"docs/runbooks.md has no section ## {name}"
        start = sections[name]
        end = min([s for s in sections.values() if s > start], default=len(text))
        body = text[start:end]
        for part in ("**What it means.**", "**What to check.**", "**What to do.**"):
            assert part in body, f"{name}: {part} missing in docs/runbooks.md"
    assert set(sections) == set(alerts()), "a runbook section for an alert that does not exist"
