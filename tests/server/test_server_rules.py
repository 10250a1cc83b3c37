"""The operator's Prometheus rules and Grafana dashboard (deploy/): promtool checks them and runs their unit
tests on synthetic series, and every metric they read is one the aggregator exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from sotto.server.metrics import Metrics

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
RULES = DEPLOY / "prometheus" / "sotto-rules.yml"
RULE_TESTS = DEPLOY / "prometheus" / "sotto-rules.test.yml"
DASHBOARD = DEPLOY / "grafana" / "sotto-aggregator.json"
#: Metrics the rules may read before this aggregator exports them: the refusal counter by reason
#: (``no_credential``, ``rate_limited``, ``unparseable``, ...) comes with the server hardening work.
PENDING = {"sotto_refusals_total"}
_NAME = re.compile(r"\bsotto[_:][a-z0-9_:]+")


def _promtool(*args: str, cwd: Path = DEPLOY / "prometheus") -> subprocess.CompletedProcess[str]:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: apt-get install prometheus (tools/bootstrap.sh does, as root)"
    return subprocess.run(
        [promtool, *args], capture_output=True, text=True, timeout=120, cwd=cwd, check=False
    )


def _exported() -> set[str]:
    """Every series name the aggregator's registry can expose."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}
    return {
        family.name + suffix for family in Metrics().registry.collect() for suffix in suffixes[family.type]
    }


def test_promtool_checks_the_rules() -> None:
    proc = _promtool("check", "rules", str(RULES))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_promtool_runs_the_rule_unit_tests() -> None:
    proc = _promtool("test", "rules", RULE_TESTS.name)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_the_rule_unit_tests_catch_a_wrong_threshold(tmp_path: Path) -> None:
    """The unit tests can fail: a purge alert set to 30 hours instead of 3 no longer fires in them."""
    rules = RULES.read_text(encoding="utf-8")
    assert "sotto:purge_age_seconds > 3 * 3600" in rules
    (tmp_path / RULES.name).write_text(rules.replace("> 3 * 3600", "> 30 * 3600"), encoding="utf-8")
    shutil.copy(RULE_TESTS, tmp_path / RULE_TESTS.name)
    proc = _promtool("test", "rules", RULE_TESTS.name, cwd=tmp_path)
    assert proc.returncode != 0 and "SottoRetentionPurgeStale" in proc.stdout + proc.stderr


def test_a_broken_rule_file_is_refused(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yml"
    broken.write_text(RULES.read_text(encoding="utf-8").replace("sum by (method)", "sum by (method", 1))
    proc = _promtool("check", "rules", str(broken))
    assert proc.returncode != 0


@pytest.mark.parametrize("path", [RULES, DASHBOARD], ids=["rules", "dashboard"])
def test_every_metric_read_is_exported_or_recorded(path: Path) -> None:
    recorded = set(re.findall(r"^\s*- record: (\S+)$", RULES.read_text(encoding="utf-8"), re.MULTILINE))
    used = set(_NAME.findall(path.read_text(encoding="utf-8"))) - {"sotto:"}
    assert used, "no metric found"
    unknown = used - recorded - _exported() - PENDING
    assert not unknown, f"{path.name} reads metrics nobody exports: {sorted(unknown)}"


def test_the_dashboard_is_grafana_json_on_the_recorded_series() -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    recorded = set(re.findall(r"^\s*- record: (\S+)$", RULES.read_text(encoding="utf-8"), re.MULTILINE))
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    assert dashboard["uid"] == "sotto-aggregator" and len(exprs) >= 10
    # Every recorded series is on a panel, and every panel reads recorded series (cheap to draw).
    assert {e.split("{")[0] for e in exprs if e in recorded or e.split("{")[0] in recorded} == recorded
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
