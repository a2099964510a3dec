"""``passthrough.clusters`` goes into Envoy's /stats filter, which Envoy reads
with RE2. Python's ``re`` accepts more (lookarounds, backreferences, atomic
groups, possessive quantifiers): such a pattern used to pass ``config check``
and then every scrape failed with Envoy's 400. The config now refuses them.

Checked against a real Envoy: every pattern the config refuses for RE2 is one
Envoy refuses too, and every pattern it accepts Envoy accepts.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

import pytest

from passguard import config
from passguard.envoy.names import stats_filter
from passguard.errors import ConfigError

from .conftest import EnvoyFactory

pytestmark = pytest.mark.e2e

REFUSED = [r"outbound_passthrough_(?=ipv4)ipv4", r"outbound_passthrough_(?!x)ipv[46]",
           r"(?<=outbound_)passthrough_ipv4", r"(outbound)_passthrough_\1", r"outbound_pass++",
           r"(?>outbound)_passthrough_ipv4", r"outbound_passthrough_ipv4?+"]
ACCEPTED = [r"outbound_passthrough_ipv[46]", r"outbound_passthrough(?:_ipv[46])?",
            r"outbound_passthrough_ipv4|meshpassthrough_[a-z0-9_]+", r"[(?=]x|outbound_a+?"]


def _config_error(pattern: str, tmp_path: Path) -> str | None:
    p = tmp_path / "c.yaml"
    p.write_text(f"passthrough: {{clusters: '{pattern}'}}\n")
    try:
        config.load(p)
    except ConfigError as exc:
        return "; ".join(exc.errors)
    return None


async def test_the_config_refuses_what_envoy_refuses(envoy_factory: EnvoyFactory,
                                                     tmp_path: Path) -> None:
    envoy = await envoy_factory("unified")
    for pattern in REFUSED + ACCEPTED:
        status, body = await envoy.admin_request(
            "/stats?filter=" + quote(stats_filter(pattern), safe=""))
        error = _config_error(pattern, tmp_path)
        if pattern in REFUSED:
            assert status == 400, (pattern, status, body[:200])
            assert error is not None and "RE2" in error, (pattern, error)
        else:
            assert status == 200, (pattern, status, body[:200])
            assert error is None, (pattern, error)
