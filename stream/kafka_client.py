"""Every Kafka client the project constructs, built here with the cluster's security settings.

A cluster that asks for TLS or SASL must get them from every consumer, producer and admin
client, or the one that was missed fails to connect (or, worse, talks in the clear). So the
code base never calls ``KafkaConsumer``/``KafkaProducer``/``KafkaAdminClient`` itself: it
calls ``kafka_consumer``, ``kafka_producer`` or ``kafka_admin`` with the same keyword
arguments, and these add the security settings read from the environment
(``tests/test_kafka_client.py`` scans the repository for direct constructions).

Environment (an empty value counts as unset, as docker compose passes unset variables):

- ``KAFKA_SECURITY_PROTOCOL``: ``PLAINTEXT`` (default), ``SSL``, ``SASL_PLAINTEXT`` or
  ``SASL_SSL``;
- ``KAFKA_SASL_MECHANISM``: ``PLAIN`` (default under SASL), ``SCRAM-SHA-256`` or
  ``SCRAM-SHA-512``; ``KAFKA_SASL_USERNAME`` and ``KAFKA_SASL_PASSWORD``, both required
  under SASL;
- ``KAFKA_SSL_CAFILE`` (CA bundle, default: the system's), ``KAFKA_SSL_CERTFILE`` and
  ``KAFKA_SSL_KEYFILE`` (a client certificate, for mutual TLS), ``KAFKA_SSL_CHECK_HOSTNAME``
  (``true`` by default, or ``false``): TLS settings, for ``SSL`` and ``SASL_SSL`` only.

A value that cannot be used raises ``KafkaSecurityError`` naming the variable; so do settings
that the protocol would ignore (SASL credentials under ``SSL``, a CA file under
``PLAINTEXT``): a setting silently dropped is a connection that is less secure than intended.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer

PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
SECURITY_KWARGS = frozenset({
    "security_protocol", "sasl_mechanism", "sasl_plain_username", "sasl_plain_password",
    "ssl_cafile", "ssl_certfile", "ssl_keyfile", "ssl_check_hostname"})
_BOOLEANS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


class KafkaSecurityError(ValueError):
    """A Kafka security setting that cannot be used; the message names the variable."""


@dataclass(frozen=True)
class KafkaSecurity:
    """How clients authenticate to and encrypt traffic with the cluster.

    Constructed valid or not at all (``KafkaSecurityError``): the protocol is one of
    ``PROTOCOLS``; under SASL the mechanism is one of ``SASL_MECHANISMS`` and both username
    and password are given; SASL fields are set only under SASL and TLS fields only under
    ``SSL``/``SASL_SSL``; the certificate and key files exist.
    """

    protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: str | None = None
    ssl_cafile: Path | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    ssl_check_hostname: bool = True

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise KafkaSecurityError(
                f"KAFKA_SECURITY_PROTOCOL must be one of {', '.join(PROTOCOLS)}, "
                f"not {self.protocol!r}")
        if self.sasl:
            self._check_sasl()
        else:
            given = [name for name, value in (
                ("KAFKA_SASL_MECHANISM", self.sasl_mechanism),
                ("KAFKA_SASL_USERNAME", self.sasl_username),
                ("KAFKA_SASL_PASSWORD", self.sasl_password)) if value is not None]
            if given:
                raise KafkaSecurityError(
                    f"{', '.join(given)} set, but KAFKA_SECURITY_PROTOCOL={self.protocol} does "
                    "not use SASL (SASL_PLAINTEXT or SASL_SSL does)")
        if self.tls:
            self._check_tls()
        else:
            given = [name for name, value in (
                ("KAFKA_SSL_CAFILE", self.ssl_cafile), ("KAFKA_SSL_CERTFILE", self.ssl_certfile),
                ("KAFKA_SSL_KEYFILE", self.ssl_keyfile)) if value is not None]
            if given:
                raise KafkaSecurityError(
                    f"{', '.join(given)} set, but KAFKA_SECURITY_PROTOCOL={self.protocol} does "
                    "not use TLS (SSL or SASL_SSL does)")

    def _check_sasl(self) -> None:
        if self.sasl_mechanism not in SASL_MECHANISMS:
            raise KafkaSecurityError(
                f"KAFKA_SASL_MECHANISM must be one of {', '.join(SASL_MECHANISMS)}, "
                f"not {self.sasl_mechanism!r}")
        missing = [name for name, value in (("KAFKA_SASL_USERNAME", self.sasl_username),
                                            ("KAFKA_SASL_PASSWORD", self.sasl_password))
                   if not value]
        if missing:
            raise KafkaSecurityError(
                f"KAFKA_SECURITY_PROTOCOL={self.protocol} needs {' and '.join(missing)}")

    def _check_tls(self) -> None:
        for name, path in (("KAFKA_SSL_CAFILE", self.ssl_cafile),
                           ("KAFKA_SSL_CERTFILE", self.ssl_certfile),
                           ("KAFKA_SSL_KEYFILE", self.ssl_keyfile)):
            if path is not None and not path.is_file():
                raise KafkaSecurityError(f"{name}={path}: no such file")
        if self.ssl_keyfile is not None and self.ssl_certfile is None:
            raise KafkaSecurityError("KAFKA_SSL_KEYFILE is set without KAFKA_SSL_CERTFILE")

    @property
    def sasl(self) -> bool:
        return self.protocol.startswith("SASL_")

    @property
    def tls(self) -> bool:
        return self.protocol.endswith("SSL")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> KafkaSecurity:
        """The settings of the ``KAFKA_*`` variables above (``os.environ`` by default)."""
        env = os.environ if environ is None else environ

        def value(name: str) -> str | None:
            return env.get(name) or None

        def path(name: str) -> Path | None:
            given = value(name)
            return Path(given) if given else None

        protocol = (value("KAFKA_SECURITY_PROTOCOL") or "PLAINTEXT").upper()
        mechanism = value("KAFKA_SASL_MECHANISM")
        if mechanism is None and protocol.startswith("SASL_"):
            mechanism = "PLAIN"
        check = (value("KAFKA_SSL_CHECK_HOSTNAME") or "true").lower()
        if check not in _BOOLEANS:
            raise KafkaSecurityError(
                f"KAFKA_SSL_CHECK_HOSTNAME must be true or false, not {check!r}")
        return cls(
            protocol=protocol,
            sasl_mechanism=mechanism.upper() if mechanism else None,
            sasl_username=value("KAFKA_SASL_USERNAME"),
            sasl_password=value("KAFKA_SASL_PASSWORD"),
            ssl_cafile=path("KAFKA_SSL_CAFILE"),
            ssl_certfile=path("KAFKA_SSL_CERTFILE"),
            ssl_keyfile=path("KAFKA_SSL_KEYFILE"),
            ssl_check_hostname=_BOOLEANS[check],
        )

    def client_kwargs(self) -> dict[str, Any]:
        """The kafka-python keyword arguments of these settings (the same for every client
        kind): ``security_protocol`` always, the ``sasl_*`` ones under SASL, the ``ssl_*``
        ones under TLS (files only when given)."""
        kwargs: dict[str, Any] = {"security_protocol": self.protocol}
        if self.sasl:
            kwargs.update(sasl_mechanism=self.sasl_mechanism,
                          sasl_plain_username=self.sasl_username,
                          sasl_plain_password=self.sasl_password)
        if self.tls:
            kwargs["ssl_check_hostname"] = self.ssl_check_hostname
            for name, file in (("ssl_cafile", self.ssl_cafile),
                               ("ssl_certfile", self.ssl_certfile),
                               ("ssl_keyfile", self.ssl_keyfile)):
                if file is not None:
                    kwargs[name] = str(file)
        return kwargs


def _with_security(config: dict[str, Any], security: KafkaSecurity | None) -> dict[str, Any]:
    """``config`` plus the security settings; a caller may not set those itself."""
    clash = sorted(SECURITY_KWARGS.intersection(config))
    if clash:
        raise TypeError(f"security settings come from the environment, not from callers: "
                        f"{', '.join(clash)}")
    return {**config, **(security or KafkaSecurity.from_env()).client_kwargs()}


def kafka_consumer(*topics: str, security: KafkaSecurity | None = None,
                   **config: Any) -> KafkaConsumer:
    """``KafkaConsumer(*topics, **config)`` with the security settings (``security``, or
    ``KafkaSecurity.from_env()`` when None). It asks the broker not to create the topics it
    reads (``allow_auto_create_topics=False`` unless given): a topic made by a metadata request
    gets the broker's default partition count, not the co-partitioned one ``ensure_topics``
    gives. Kafka honours the flag; Tansu creates the topic anyway."""
    config.setdefault("allow_auto_create_topics", False)
    return KafkaConsumer(*topics, **_with_security(config, security))


def kafka_producer(*, security: KafkaSecurity | None = None, **config: Any) -> KafkaProducer:
    """``KafkaProducer(**config)`` with the security settings, as ``kafka_consumer``."""
    return KafkaProducer(**_with_security(config, security))


def kafka_admin(*, security: KafkaSecurity | None = None, **config: Any) -> KafkaAdminClient:
    """``KafkaAdminClient(**config)`` with the security settings, as ``kafka_consumer``."""
    return KafkaAdminClient(**_with_security(config, security))
