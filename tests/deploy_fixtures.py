"""Reading the deployment files as ``docker compose`` and Grafana would, without Docker.

- ``env_example()``: the settings of ``.env.example`` (``NAME=value`` lines).
- ``compose_env()``: those plus a test value for each required secret (``TEST_SECRETS``),
  which ``.env.example`` leaves empty: what a filled-in ``.env`` gives.
- ``interpolate(value, env)``: compose's variable interpolation on a parsed YAML value:
  ``$$``, ``$VAR``, ``${VAR}``, ``${VAR:-default}``, ``${VAR-default}``, ``${VAR:?message}``,
  ``${VAR?message}`` (a missing required variable raises ``KeyError``), on every string.
- ``compose_config(env)``: ``docker-compose.yml`` parsed (YAML anchors and ``<<`` merges
  resolved), interpolated with ``env``, top-level ``x-`` extensions dropped: roughly what
  ``docker compose config`` prints.
- ``compose_variables()``: every variable the compose file names, with its default (``None``
  when it has none).
- ``dashboard_exprs()`` / ``metric_names(expr)``: the dashboard's PromQL and the ``unirec_*``
  metric names in it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "docker-compose.yml"
ENV_EXAMPLE = REPO / ".env.example"
DOCKERFILE = REPO / "deploy" / "Dockerfile"
PROMETHEUS = REPO / "deploy" / "prometheus.yml"
GRAFANA = REPO / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "unirec.json"

# The variables compose requires (``${VAR:?message}``), each with a value for the tests.
TEST_SECRETS = {"GRAFANA_ADMIN_PASSWORD": "test-only-grafana-password",
                "UNIREC_API_TOKEN": "test-only-api-token"}

_VAR = re.compile(
    r"\$(?:(?P<escaped>\$)|(?P<bare>[A-Za-z_][A-Za-z0-9_]*)"
    r"|\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:-|-|:\?|\?)(?P<arg>[^}]*))?\})"
)
_METRIC = re.compile(r"\bunirec_[a-z0-9_]+\b")


def env_example(path: Path = ENV_EXAMPLE) -> dict[str, str]:
    """``NAME=value`` lines of an env file (comments and blank lines skipped)."""
    settings: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, sep, value = line.partition("=")
            assert sep, f"not NAME=value: {line!r}"
            settings[name.strip()] = value.strip()
    return settings


def compose_env() -> dict[str, str]:
    """``.env.example`` with the required secrets filled in (``TEST_SECRETS``)."""
    return env_example() | TEST_SECRETS


def _substitute(text: str, env: dict[str, str]) -> str:
    def one(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        name = match["bare"] or match["name"]
        op, arg = match["op"], match["arg"] or ""
        value = env.get(name)
        if op == ":-":
            return value if value else arg
        if op == "-":
            return arg if value is None else value
        if op in (":?", "?") and (value is None or (op == ":?" and not value)):
            raise KeyError(f"required variable {name} is not set: {arg}")
        return value or ""

    return _VAR.sub(one, text)


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """``value`` with every string interpolated (mapping keys are left as they are)."""
    if isinstance(value, str):
        return _substitute(value, env)
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    return value


def compose_raw() -> dict[str, Any]:
    """The compose file as YAML gives it: anchors and merges resolved, nothing interpolated."""
    return yaml.safe_load(COMPOSE.read_text())


def compose_config(env: dict[str, str]) -> dict[str, Any]:
    """The compose file interpolated with ``env``, without its ``x-`` extensions."""
    raw = {k: v for k, v in compose_raw().items() if not k.startswith("x-")}
    return interpolate(raw, env)


def compose_variables() -> dict[str, str | None]:
    """Every ``${VAR...}``/``$VAR`` in the compose file: name -> its ``:-``/``-`` default."""
    found: dict[str, str | None] = {}
    for match in _VAR.finditer(COMPOSE.read_text()):
        name = match["bare"] or match["name"]
        if name is None:
            continue
        default = match["arg"] if match["op"] in (":-", "-") else None
        if found.get(name) is None:
            found[name] = default
    return found


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def dashboard_exprs() -> list[tuple[str, str]]:
    """``(panel title, PromQL)`` of every target of every panel (rows' panels included)."""
    def panels(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out = []
        for panel in items:
            out.append(panel)
            out.extend(panels(panel.get("panels", [])))
        return out

    return [(p["title"], t["expr"]) for p in panels(dashboard()["panels"])
            for t in p.get("targets", [])]


def metric_names(expr: str) -> set[str]:
    """The ``unirec_*`` names in a PromQL expression (as written: ``_total``, ``_bucket``)."""
    return set(_METRIC.findall(expr))
