"""``stream.kafka_client``: the cluster's security settings reach every Kafka client.

- The environment becomes exactly the kafka-python keyword arguments it describes, and a
  setting that cannot be used is an error naming its variable.
- No module of the code base outside ``stream/kafka_client.py`` constructs (or hands out)
  ``KafkaConsumer``, ``KafkaProducer`` or ``KafkaAdminClient`` itself: a scan of the syntax
  tree of every Python file (tests excepted: their clients talk to the plaintext brokers the
  tests start themselves). The scanner is checked on sources that do.
- Against the embedded broker: with no security variables set the project's own entry
  points (topic admin, producer, consumer) connect as before; with ``SASL_PLAINTEXT`` set
  the same entry points fail to connect to that plaintext broker, which they can only do if
  the settings reached their clients.
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest
from deploy_fixtures import REPO

from stream.kafka_client import (
    SECURITY_KWARGS,
    KafkaSecurity,
    KafkaSecurityError,
    kafka_admin,
    kafka_consumer,
    kafka_producer,
)
from stream.producer import open_producer
from stream.topics import BrokerUnavailable, TopicNames, end_offsets, ensure_topics

CLIENT_CLASSES = {"KafkaConsumer", "KafkaProducer", "KafkaAdminClient"}
FACTORY_MODULE = Path("stream/kafka_client.py")
ENV_NAMES = ("KAFKA_SECURITY_PROTOCOL", "KAFKA_SASL_MECHANISM", "KAFKA_SASL_USERNAME",
             "KAFKA_SASL_PASSWORD", "KAFKA_SSL_CAFILE", "KAFKA_SSL_CERTFILE",
             "KAFKA_SSL_KEYFILE", "KAFKA_SSL_CHECK_HOSTNAME")


@pytest.fixture
def pem(tmp_path: Path) -> Path:
    """A file to name as CA bundle, certificate or key (only its existence is checked)."""
    path = tmp_path / "ca.pem"
    path.write_text("-----BEGIN CERTIFICATE-----\n")
    return path


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No KAFKA_* security variable set, whatever the calling shell has."""
    for name in ENV_NAMES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


# ------------------------------------------------------------------- env -> client kwargs


def test_no_variables_or_empty_ones_mean_plaintext() -> None:
    """Unset and empty (what compose passes for an unset `${VAR:-}`) are the same: PLAINTEXT,
    and nothing else is passed to the clients."""
    assert KafkaSecurity.from_env({}).client_kwargs() == {"security_protocol": "PLAINTEXT"}
    empty = dict.fromkeys(ENV_NAMES, "")
    assert KafkaSecurity.from_env(empty) == KafkaSecurity()


def test_sasl_ssl_env_becomes_the_kafka_python_kwargs(pem: Path) -> None:
    """Every variable lands in its kafka-python argument, and the set of arguments is the
    one the factories treat as security settings."""
    env = {"KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
           "KAFKA_SASL_USERNAME": "unirec", "KAFKA_SASL_PASSWORD": "s3cret",
           "KAFKA_SSL_CAFILE": str(pem), "KAFKA_SSL_CERTFILE": str(pem),
           "KAFKA_SSL_KEYFILE": str(pem), "KAFKA_SSL_CHECK_HOSTNAME": "false"}
    kwargs = KafkaSecurity.from_env(env).client_kwargs()
    assert kwargs == {"security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512",
                      "sasl_plain_username": "unirec", "sasl_plain_password": "s3cret",
                      "ssl_cafile": str(pem), "ssl_certfile": str(pem),
                      "ssl_keyfile": str(pem), "ssl_check_hostname": False}
    assert set(kwargs) == SECURITY_KWARGS


@pytest.mark.parametrize(("env", "expected"), [
    ({"KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "KAFKA_SASL_USERNAME": "u",
      "KAFKA_SASL_PASSWORD": "p"},
     {"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "PLAIN",
      "sasl_plain_username": "u", "sasl_plain_password": "p"}),
    ({"KAFKA_SECURITY_PROTOCOL": "ssl"},
     {"security_protocol": "SSL", "ssl_check_hostname": True}),
], ids=["sasl-defaults-to-PLAIN-and-no-tls", "ssl-lowercase-system-CAs-hostname-checked"])
def test_defaults_under_each_protocol(env: dict[str, str], expected: dict[str, object]) -> None:
    assert KafkaSecurity.from_env(env).client_kwargs() == expected


@pytest.mark.parametrize(("env", "named"), [
    ({"KAFKA_SECURITY_PROTOCOL": "TLS"}, "KAFKA_SECURITY_PROTOCOL"),
    ({"KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "KAFKA_SASL_MECHANISM": "GSSAPI",
      "KAFKA_SASL_USERNAME": "u", "KAFKA_SASL_PASSWORD": "p"}, "KAFKA_SASL_MECHANISM"),
    ({"KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "KAFKA_SASL_USERNAME": "u"},
     "KAFKA_SASL_PASSWORD"),
    ({"KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "KAFKA_SASL_PASSWORD": "p"},
     "KAFKA_SASL_USERNAME"),
    ({"KAFKA_SASL_USERNAME": "u", "KAFKA_SASL_PASSWORD": "p"}, "KAFKA_SASL_USERNAME"),
    ({"KAFKA_SSL_CAFILE": "/etc/ssl/ca.pem"}, "KAFKA_SSL_CAFILE"),
    ({"KAFKA_SECURITY_PROTOCOL": "SSL", "KAFKA_SSL_CAFILE": "/no/such/ca.pem"},
     "KAFKA_SSL_CAFILE"),
    ({"KAFKA_SECURITY_PROTOCOL": "SSL", "KAFKA_SSL_CHECK_HOSTNAME": "maybe"},
     "KAFKA_SSL_CHECK_HOSTNAME"),
], ids=["bad-protocol", "bad-mechanism", "sasl-without-password", "sasl-without-username",
        "sasl-credentials-under-plaintext", "ca-file-under-plaintext", "missing-ca-file",
        "bad-check-hostname"])
def test_an_unusable_setting_is_an_error_naming_the_variable(
        env: dict[str, str], named: str) -> None:
    with pytest.raises(KafkaSecurityError, match=named):
        KafkaSecurity.from_env(env)


def test_a_caller_cannot_override_the_security_settings() -> None:
    """A security argument given at a construction site would bypass the environment: it is
    refused before any connection is attempted."""
    with pytest.raises(TypeError, match="security_protocol"):
        kafka_producer(bootstrap_servers="127.0.0.1:1", security_protocol="PLAINTEXT")


# ------------------------------------------------------ no client is constructed elsewhere


def client_references(source: str) -> list[str]:
    """``line: what`` for each use of a Kafka client class in ``source`` other than an import
    or a type annotation: a call, an alias, or the class passed around as a value."""
    tree = ast.parse(source)
    in_annotations: set[int] = set()
    for node in ast.walk(tree):
        annotations = []
        if isinstance(node, ast.arg | ast.AnnAssign):
            annotations.append(node.annotation)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            annotations.append(node.returns)
        for annotation in filter(None, annotations):
            in_annotations.update(id(n) for n in ast.walk(annotation))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom | ast.Import):
            found += [f"{node.lineno}: import {a.name} as {a.asname}" for a in node.names
                      if a.name.rsplit(".", 1)[-1] in CLIENT_CLASSES and a.asname]
            continue
        name = (node.id if isinstance(node, ast.Name)
                else node.attr if isinstance(node, ast.Attribute) else None)
        if name in CLIENT_CLASSES and id(node) not in in_annotations:
            found.append(f"{node.lineno}: {name}")
    return found


def python_files() -> list[Path]:
    """The repository's Python files, relative to it: every folder but hidden ones (.venv,
    .git), build output and tests."""
    skip = {"tests", "build", "dist", "runs", "__pycache__"}
    found = []
    for folder, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in skip
                   and not d.endswith(".egg-info")]
        found += [Path(folder, f).relative_to(REPO) for f in files if f.endswith(".py")]
    return found


@pytest.mark.parametrize("source", [
    "from kafka import KafkaConsumer\nc = KafkaConsumer('t', bootstrap_servers='b')\n",
    "import kafka\np = kafka.KafkaProducer(bootstrap_servers='b')\n",
    "from kafka import KafkaAdminClient as Admin\n",
    "import functools, kafka\nmake = functools.partial(kafka.KafkaAdminClient, x=1)\n",
], ids=["call", "attribute-call", "alias", "passed-as-value"])
def test_the_scanner_finds_direct_constructions(source: str) -> None:
    assert client_references(source)


def test_the_scanner_allows_imports_and_annotations() -> None:
    source = ("from __future__ import annotations\nfrom kafka import KafkaProducer\n"
              "def send(p: KafkaProducer) -> KafkaProducer:\n    q: KafkaProducer = p\n"
              "    return q\n")
    assert client_references(source) == []


def test_every_kafka_client_is_built_by_the_factory_module() -> None:
    files = python_files()
    assert FACTORY_MODULE in files and Path("stream/worker.py") in files
    assert client_references((REPO / FACTORY_MODULE).read_text()), "the scanner sees them"
    offenders = {str(path): refs for path in files if path != FACTORY_MODULE
                 for refs in [client_references((REPO / path).read_text())] if refs}
    assert offenders == {}, ("construct Kafka clients with stream.kafka_client's "
                             f"kafka_consumer/kafka_producer/kafka_admin: {offenders}")


# ---------------------------------------------------------------- against the real broker


def test_plaintext_default_talks_to_the_embedded_broker(
        bootstrap: str, clean_env: pytest.MonkeyPatch) -> None:
    """With no security variables, the factories' clients and the project's entry points
    (topic admin, producer, end offsets) work: one record goes in and comes back."""
    topics = TopicNames.with_prefix("plain-")
    ensure_topics(bootstrap, 1, topics=topics, timeout_s=10)
    admin = kafka_admin(bootstrap_servers=bootstrap)
    try:
        assert admin.describe_cluster()["cluster_id"]
    finally:
        admin.close()
    producer = open_producer(bootstrap, timeout_s=10)
    producer.send(topics.interactions, key=b"u1", value=b"hello").get(timeout=10)
    producer.close()
    assert end_offsets(bootstrap, topics.interactions, 10) == {0: 1}
    consumer = kafka_consumer(topics.interactions, bootstrap_servers=bootstrap, group_id=None,
                              auto_offset_reset="earliest", consumer_timeout_ms=5000)
    try:
        assert [r.value for r in consumer] == [b"hello"]
        assert consumer.config["security_protocol"] == "PLAINTEXT"
    finally:
        consumer.close()


def test_sasl_settings_reach_the_projects_clients(
        bootstrap: str, clean_env: pytest.MonkeyPatch) -> None:
    """With SASL_PLAINTEXT in the environment, the topic admin and the producer of the
    project try SASL with the plaintext-only embedded broker and cannot connect."""
    clean_env.setenv("KAFKA_SECURITY_PROTOCOL", "SASL_PLAINTEXT")
    clean_env.setenv("KAFKA_SASL_USERNAME", "unirec")
    clean_env.setenv("KAFKA_SASL_PASSWORD", "s3cret")
    with pytest.raises(BrokerUnavailable):
        ensure_topics(bootstrap, 1, topics=TopicNames.with_prefix("sasl-"), timeout_s=2)
    with pytest.raises(BrokerUnavailable):
        open_producer(bootstrap, timeout_s=2)


def test_the_cli_reports_an_unusable_setting_by_name(
        clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """``unirec produce`` with a bad protocol stops with exit 2 and one line naming the
    variable, before any connection (nothing listens at the address given)."""
    from app.cli import main

    clean_env.setenv("KAFKA_SECURITY_PROTOCOL", "TLS")
    code = main(["produce", "--synthetic", "5", "--bootstrap-servers", "127.0.0.1:1"])
    err = capsys.readouterr().err
    assert code == 2 and "KAFKA_SECURITY_PROTOCOL must be one of" in err
    assert "Traceback" not in err
