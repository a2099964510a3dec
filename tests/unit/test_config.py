"""Config validation: every key of the example parses; every error names its key path."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from passguard import config
from passguard.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def test_example_config_is_valid_and_matches_defaults() -> None:
    cfg = config.load(ROOT / "config" / "passguard.example.yaml")
    defaults = config.Config()
    assert cfg.scrape == defaults.scrape
    assert cfg.window == defaults.window == 900
    assert cfg.passthrough_clusters == defaults.passthrough_clusters
    assert cfg.gate == defaults.gate
    assert cfg.limits == defaults.limits
    assert cfg.state_path == ROOT / "config" / "passguard-state.db"
    [src] = cfg.sources
    assert src.targets[0].url == "http://127.0.0.1:9901"


def errors_of(text: str, tmp_path: Path) -> list[str]:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as info:
        config.load(p)
    return info.value.errors


@pytest.mark.parametrize(("text", "error"), [
    ("listen: nope", "listen: 'nope' is not host:port"),
    ("scrape: {interval: 15}",
     "scrape.interval: must be a duration string like '15s', got a number"),
    ("scrape: {interval: 15 s, timeout: 20s}", "scrape.timeout: (20s) must not exceed"),
    ("scrape: {intervall: 15s}", "scrape.intervall: unknown key"),
    ("window: 1fortnight", "window: '1fortnight' is not a duration"),
    ("bogus: 1", "bogus: unknown key"),
    ("gate: {mode: block}", "gate.mode: must be one of enforce, warn, audit, got 'block'"),
    ("gate: {meshes: {prod: {mode: loud}}}", "gate.meshes.prod.mode: must be one of"),
    ("passthrough: {clusters: '(unclosed'}", "passthrough.clusters: invalid regular expression"),
    ("sources: [{kind: envoy, targets: [{url: http://a:1}, {url: http://b:1}, {url: ftp://x}]}]",
     "sources[0].targets[2].url: 'ftp://x' must start with http://, https:// or unix://"),
    ("sources: [{kind: envoy, targets: [{url: http://a:1, labels: {mesh: [1]}}]}]",
     "sources[0].targets[0].labels.mesh: must be a string, got a list"),
    ("sources: [{kind: envoy, targets: [{url: http://a:1, labels: {dataplane: x}}, "
     "{url: http://b:1, labels: {dataplane: x}}]}]", "is listed twice"),
    ("sources: [{kind: consul}]",
     "sources[0].kind: must be 'envoy', 'kuma' or 'prometheus', got 'consul'"),
    ("sources: [{kind: prometheus, url: 'http://p:9090', labels: {mesh: 1}}]",
     "sources[0].labels.mesh: must be a non-empty string"),
    ("sources: [{kind: prometheus, url: 'http://p:9090', metrics: statsd}]",
     "sources[0].metrics: must be one of envoy, passguard"),
    ("sources: [{kind: prometheus, url: 'http://p:9090', extra_selector: 'up{'}]",
     "sources[0].extra_selector"),
    ("sources: [{kind: kuma, url: 'ftp://x', stats: grpc}]", "sources[0].url: 'ftp://x' must be"),
    ("sources: [{kind: kuma, url: 'https://cp:5682', stats: grpc}]",
     "sources[0].stats: must be one of inspect, kuma-dp"),
    ("listen: 0.0.0.0:9110", "listen: 0.0.0.0:9110 is not a loopback address"),
    ("limits: {body_timeout: 10ms}", "limits.body_timeout: must be at least 0.1s"),
    ("limits: {max_connections: 2}",
     "limits.max_connections: must be between 4 and 1000000, got 2"),
    ("limits: {max_connections: many}", "limits.max_connections"),
    ("scrape: {max_response_bytes: 2MiB, max_buffered_bytes: 1MiB}",
     "scrape.max_buffered_bytes: (1048576 bytes) must be at least scrape.max_response_bytes"),
    ("sources: [{kind: kuma, url: 'https://cp:5682', max_response_bytes: lots}]",
     "sources[0].max_response_bytes"),
    ("scrape: {spread: fast}", "scrape.spread: 'fast' is not a duration"),
    ("scrape: {spread: 5}", "scrape.spread: must be 'auto' or a duration like '5s', got a number"),
    ("scrape: {interval: 15s, timeout: 5s, spread: 11s}",
     "scrape.spread: (11s) plus scrape.timeout (5s) must not exceed scrape.interval (15s)"),
    ("destinations: {interval: 60s, spread: 58s}",
     "destinations.spread: (58s) plus scrape.timeout (5s) must not exceed "
     "destinations.interval (1m)"),
    ("a: 1\na: 2", "duplicate"),
    ("- just\n- a list", "must be a mapping, got a list"),
])
def test_errors_name_the_key_path(text: str, error: str, tmp_path: Path) -> None:
    errs = errors_of(text, tmp_path)
    assert any(error in e for e in errs), errs


def test_all_errors_reported_at_once(tmp_path: Path) -> None:
    errs = errors_of("window: x\ngate: {mode: y}\nscrape: {timeout: z}", tmp_path)
    assert len(errs) == 3


def test_document_limits(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("limits: {max_nodes: 5000, max_scalar_bytes: 1KiB, max_depth: 8}\n")
    docs = config.load(p).limits.documents
    assert (docs.max_nodes, docs.max_scalar_bytes, docs.max_depth) == (5000, 1024, 8)
    assert config.load(p).limits.max_connections == 1024  # the default
    p.write_text("limits: {max_connections: 64}\n")
    assert config.load(p).limits.max_connections == 64
    p.write_text("scrape: {max_buffered_bytes: 512MiB}\n"
                 "sources: [{kind: kuma, url: 'https://cp:5682', max_response_bytes: 8MiB}]\n")
    cfg = config.load(p)
    assert cfg.scrape.max_buffered_bytes == 512 * 1024 * 1024
    assert cfg.sources[0].max_response_bytes == 8 * 1024 * 1024  # type: ignore[union-attr]
    assert "limits.max_nodes: must be between 100 and 100000000, got 5" in errors_of(
        "limits: {max_nodes: 5}", tmp_path)


def test_spread(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("scrape: {spread: 0s}\ndestinations: {spread: 20s}\n")
    cfg = config.load(p)
    assert (cfg.scrape.spread, cfg.destinations.spread) == (0.0, 20.0)
    p.write_text("scrape: {spread: auto}\ndestinations: {interval: 30s}\n")
    cfg = config.load(p)
    assert (cfg.scrape.spread, cfg.destinations.spread, cfg.destinations.interval) == (
        None, None, 30.0)


def test_insecure_allows_public_bind(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("listen: 0.0.0.0:9110\nauth: {insecure: true}\n")
    assert config.load(p).listen.port == 9110


def test_restart_changes_name_their_keys(tmp_path: Path) -> None:
    """What a reload cannot apply (the socket, the database, TLS on/off)."""
    old = config.build({"listen": "127.0.0.1:9110"}, tmp_path)
    same = config.build({"listen": "127.0.0.1:9110", "window": "5m"}, tmp_path)
    assert config.restart_changes(old, same) == []
    tls = {"cert_file": "t.crt", "key_file": "t.key"}
    new = config.build({"listen": "localhost:9110", "state": {"path": "x.db"},
                        "auth": {"tls": tls}}, tmp_path)
    problems = config.restart_changes(old, new)
    assert [p.split(":", 1)[0] for p in problems] == ["listen", "state.path", "auth.tls"]
    assert all("restart passguard" in p for p in problems)
    assert "turning TLS off" in config.restart_changes(new, old)[2]


def test_auth_rule() -> None:
    none, tokens = config.AuthConfig(), config.AuthConfig(tokens_file=Path("t.yaml"))
    assert config.auth_rule_error("127.0.0.1:1", True, none) is None
    assert config.auth_rule_error("0.0.0.0:1", False, tokens) is None
    assert config.auth_rule_error("0.0.0.0:1", False, config.AuthConfig(insecure=True)) is None
    problem = config.auth_rule_error("0.0.0.0:1", False, none)
    assert problem is not None and "auth.insecure: true" in problem


def test_durations() -> None:
    assert config.parse_duration("500ms") == 0.5
    assert config.parse_duration("15m") == 900
    assert config.format_duration(900) == "15m"
    assert config.format_duration(90) == "90s"


def test_config_check_cli_exit_codes(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text("window: 5m\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text("window: 5 minutes\nscrape: {concurrency: 0}\n")
    ok = subprocess.run([sys.executable, "-m", "passguard", "config", "check", "-c", str(good)],
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert "valid" in ok.stdout
    ko = subprocess.run([sys.executable, "-m", "passguard", "config", "check", "-c", str(bad)],
                        capture_output=True, text=True, timeout=60)
    assert ko.returncode == 2
    assert "window:" in ko.stderr and "scrape.concurrency:" in ko.stderr
    assert "Traceback" not in ko.stderr
    missing = subprocess.run([sys.executable, "-m", "passguard", "config", "check", "-c",
                              str(tmp_path / "nope.yaml")], capture_output=True, text=True,
                             timeout=60)
    assert missing.returncode == 2 and "cannot read" in missing.stderr


def uncommented_example() -> str:
    """config/passguard.example.yaml with its optional blocks (kuma and prometheus
    sources, tokens, TLS) uncommented: the lines the file marks as such."""
    text = (ROOT / "config" / "passguard.example.yaml").read_text()
    out = []
    for line in text.splitlines():
        stripped = line.lstrip()
        indent = len(line) - len(stripped)
        # "  # - kind: kuma" → "  - kind: kuma"; "  #   url: …" → "    url: …"
        if stripped.startswith("# ") and (
                stripped[2:].startswith(("- kind:", "tokens_file:", "tls:"))
                or (stripped.startswith("#   ") and stripped[4:5].isalpha())):
            body = stripped[2:]
            out.append(" " * indent + body.split("  #")[0].rstrip())
        else:
            out.append(line)
    return "\n".join(out)


def test_commented_example_blocks_are_valid_when_uncommented(tmp_path: Path) -> None:
    """The example's optional blocks (kuma source, tokens, TLS) must not rot."""
    p = tmp_path / "full.yaml"
    p.write_text(uncommented_example())
    cfg = config.load(p)
    kinds = [s.kind for s in cfg.sources]
    assert kinds == ["envoy", "kuma", "prometheus"]
    kuma = cfg.sources[1]
    assert kuma.kind == "kuma" and kuma.stats == "inspect" and kuma.page_size == 100
    assert cfg.auth.tokens_file == Path("/etc/passguard/tokens.yaml")
    assert cfg.auth.tls is not None and cfg.auth.tls.client_ca_file is not None


def test_prometheus_source(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("sources:\n  - kind: prometheus\n    url: http://thanos:9090\n"
                 "    labels: {mesh: k_mesh, dataplane: k_dp}\n    token_file: tok\n"
                 "    scrape_interval: 15s\n    headers: {X-Scope-OrgID: team-a}\n")
    [src] = config.load(p).sources
    assert src.kind == "prometheus"
    assert (src.labels.mesh, src.labels.dataplane, src.labels.service) == (
        "k_mesh", "k_dp", "service")
    assert src.token_file == str(tmp_path / "tok") and src.scrape_interval == 15
    assert src.headers == (("X-Scope-OrgID", "team-a"),)


# -- issue 13, finding 8: credentials in URLs; finding 6: allowed_cidrs -------------

@pytest.mark.parametrize(("text", "key"), [
    ("sources:\n  - kind: envoy\n    targets:\n      - url: http://admin:hunter2@10.0.0.5:9901\n",
     "sources[0].targets[0].url"),
    ("sources:\n  - kind: kuma\n    url: https://passguard:hunter2@kuma-cp:5682\n",
     "sources[0].url"),
    ("sources:\n  - kind: prometheus\n    url: http://reader:hunter2@prometheus:9090\n",
     "sources[0].url"),
    ("sources:\n  - kind: kuma\n    url: https://hunter2@kuma-cp:5682/api?x=1\n",
     "sources[0].url"),
])
def test_urls_with_user_information_are_refused(text: str, key: str, tmp_path: Path) -> None:
    """A URL is a /metrics label and a word in logs: a password in it would be
    published. The error names the key and does not repeat the secret."""
    errors = errors_of(text, tmp_path)
    assert len(errors) == 1, errors
    assert errors[0].startswith(f"{key}: must not carry user information"), errors
    assert "hunter2" not in errors[0]


def test_target_file_urls_with_user_information_are_refused(tmp_path: Path) -> None:
    p = tmp_path / "targets.yaml"
    p.write_text("- url: http://u:hunter2@127.0.0.1:9901\n  labels: {dataplane: a}\n")
    with pytest.raises(ConfigError) as info:
        config.load_target_file(p)
    [error] = info.value.errors
    assert error.startswith(f"{p}[0].url: must not carry user information")
    assert "hunter2" not in error


def test_config_check_cli_does_not_print_the_password(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("sources:\n  - kind: kuma\n    url: https://u:hunter2@kuma-cp:5682\n")
    ko = subprocess.run([sys.executable, "-m", "passguard", "config", "check", "-c", str(bad)],
                        capture_output=True, text=True, timeout=60)
    assert ko.returncode == 2 and "sources[0].url: must not carry user information" in ko.stderr
    assert "hunter2" not in ko.stderr + ko.stdout and "Traceback" not in ko.stderr


def test_allowed_cidrs(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("sources:\n  - kind: kuma\n    url: http://cp:5681\n    stats: kuma-dp\n"
                 "    allowed_cidrs: [10.0.0.0/8, 'fd00::/8']\n")
    [src] = config.load(p).sources
    assert [str(n) for n in src.allowed_cidrs] == ["10.0.0.0/8", "fd00::/8"]


@pytest.mark.parametrize(("value", "error"), [
    ("[]", "sources[0].allowed_cidrs: must be a non-empty list of CIDRs"),
    ("10.0.0.0/8", "sources[0].allowed_cidrs: must be a non-empty list of CIDRs"),
    ("[10.0.0.1/8]", "sources[0].allowed_cidrs[0]: '10.0.0.1/8' is not a CIDR: "
                     "10.0.0.1/8 has host bits set"),
    ("[10.0.0.0/8, nope]", "sources[0].allowed_cidrs[1]: 'nope' is not a CIDR"),
    ("[8]", "sources[0].allowed_cidrs[0]: must be a CIDR string"),
])
def test_allowed_cidrs_errors(value: str, error: str, tmp_path: Path) -> None:
    errors = errors_of("sources:\n  - kind: kuma\n    url: http://cp:5681\n    stats: kuma-dp\n"
                       f"    allowed_cidrs: {value}\n", tmp_path)
    assert any(e.startswith(error) for e in errors), errors


def test_allowed_cidrs_only_with_kuma_dp(tmp_path: Path) -> None:
    errors = errors_of("sources:\n  - kind: kuma\n    url: http://cp:5681\n"
                       "    allowed_cidrs: [10.0.0.0/8]\n", tmp_path)
    assert errors == ["sources[0].allowed_cidrs: applies to stats: kuma-dp only (the addresses "
                      "of the dataplanes' metrics endpoints)"]


def test_log_format(tmp_path: Path) -> None:
    assert config.Config().log_format == "text"
    p = tmp_path / "c.yaml"
    p.write_text("log: {format: json}\n")
    assert config.load(p).log_format == "json"
    assert errors_of("log: {format: xml}", tmp_path) == [
        "log.format: must be one of text, json, got 'xml'"]
    assert errors_of("log: {level: debug}", tmp_path) == [
        "log.level: unknown key (known keys: format)"]
