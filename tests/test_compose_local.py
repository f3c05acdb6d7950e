"""The compose stack, run without Docker: each service's own command from ``docker-compose.yml``.

``docker-compose.yml`` is read and interpolated as ``docker compose`` would with ``.env.example``
plus the test secrets (``deploy_fixtures.compose_env``); each unirec service's ``command`` and
``environment`` are run as local processes, changed only where a container differs from a
local process (``Localized``):

- volume paths become temporary directories (``/state``, ``/runs``, ``/versions``, ``/data``;
  ``/app`` is the repository), and the image's ``UNIREC_*`` ``ENV`` (``UNIREC_DATA_DIR``...)
  is read from ``deploy/Dockerfile`` and localized the same way (its ``PATH`` and virtualenv
  are the image's own: this interpreter's are used);
- ``unirec`` is ``python -m app.cli`` and ``python`` this interpreter;
- the ``kafka`` service is the embedded broker: its compose address (``kafka:19092``) becomes
  the broker's;
- every container has its own network namespace, so each replica's ``--web-port 6066``
  becomes a free port and ``--web-bind 0.0.0.0`` becomes 127.0.0.1.

Anything else the compose file passes (a flag the CLI does not know, a missing variable) fails
the service, and the test. Services: ``train`` (its command is a no-op when the checkpoint is
in the ``runs`` volume: the test puts a tiny one there), ``trainer``, two ``worker`` replicas
each through its slot claim (``deploy/claim_slot.py``), ``producer`` (MovieLens-100K from the
local cache, copied into the ``data`` volume; skipped if absent) and the fleet ``monitor``.

Checked: every user's state is answered by its owner (the other replica answers 421 naming
it); both workers serve the trainer's model version; after one replica is killed (SIGKILL),
the other restores its partitions from ``user-states`` and answers for every user; and the
monitor aggregates the workers' ``feedback``; the Prometheus scrape config names, for each
service that serves an API, the port it listens on.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_fixtures import DOCKERFILE, PROMETHEUS, REPO, compose_config, compose_env
from stream_fixtures import http_get, tiny_checkpoint, wait_for

from eventlog.movielens import default_data_dir
from state_store import StateStore
from stream.broker import EmbeddedBroker, free_port
from stream.changelog import partition_of
from stream.http_api import fetch_state

TIMEOUT_S = 120.0
COMPOSE_KAFKA = "kafka:19092"


def dockerfile_env() -> dict[str, str]:
    """The image's ``ENV`` settings (``NAME=value`` pairs, continued lines joined)."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    env: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            env.update(dict(pair.split("=", 1) for pair in line[4:].split()))
    return env


@dataclass
class Localized:
    """Turns a service's container command and environment into a local process's."""

    volumes: dict[str, Path]  # container path -> local directory
    bootstrap: str

    def path(self, text: str) -> str:
        text = text.replace("/app/", f"{REPO}/")
        for inside in sorted(self.volumes, key=len, reverse=True):
            text = re.sub(rf"(?<![\w/]){re.escape(inside)}(?=/|\b|$)",
                          str(self.volumes[inside]), text)
        return text

    def command(self, argv: list[str], port: int) -> list[str]:
        cli = f"{sys.executable} -m app.cli"
        out: list[str] = []
        for i, arg in enumerate(argv):
            previous = argv[i - 1] if i else ""
            if previous == "--web-port":
                out.append(str(port))
            elif previous == "--web-bind" and arg == "0.0.0.0":
                out.append("127.0.0.1")
            elif arg == "unirec":
                out.extend(cli.split())
            elif arg == "python":
                out.append(sys.executable)
            else:
                out.append(self.path(arg).replace("unirec train", f"{cli} train"))
        return out

    def env(self, service: dict[str, Any]) -> dict[str, str]:
        image = {k: v for k, v in dockerfile_env().items() if k.startswith("UNIREC_")}
        env = {**{k: self.path(v) for k, v in image.items()},
               **{k: str(v) for k, v in (service.get("environment") or {}).items()}}
        env = {k: v.replace(COMPOSE_KAFKA, self.bootstrap) for k, v in env.items()}
        return {**os.environ, **env, "PYTHONPATH": str(REPO), "UNIREC_DEVICE": "cpu"}


@dataclass
class Service:
    name: str
    process: subprocess.Popen[bytes]
    log: Path
    port: int
    token: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def exited(self) -> int | None:
        return self.process.poll()

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return int(self.process.returncode)


def volume_map(service: dict[str, Any], root: Path) -> dict[str, Path]:
    mapping = {}
    for spec in service.get("volumes", []):
        source, target = spec.split(":")[:2]
        if source.startswith("./"):
            continue
        (root / source).mkdir(parents=True, exist_ok=True)
        mapping[target] = root / source
    return mapping


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[dict[str, Any]]:
    cache = default_data_dir()
    if not any(cache.glob("MovieLens100k_*")):
        pytest.skip(f"MovieLens-100K is not cached in {cache} (the producer replays it)")
    env = compose_env()
    config = compose_config(env)
    services = config["services"]
    root = tmp_path / "volumes"
    started: list[Service] = []
    with EmbeddedBroker(log_dir=tmp_path / "broker") as broker:
        def start(name: str, replica: int = 0) -> Service:
            service = services[name]
            local = Localized(volume_map(service, root), broker.bootstrap_servers)
            port = free_port()
            argv = local.command(list(service["command"]), port)
            log = tmp_path / f"{name}-{replica}.log"
            process = subprocess.Popen(argv, cwd=REPO, env=local.env(service),
                                       stdout=log.open("ab"), stderr=subprocess.STDOUT)
            running = Service(f"{name}-{replica}", process, log, port,
                              env["UNIREC_API_TOKEN"], {"argv": argv})
            started.append(running)
            return running

        # the `runs` volume holds a checkpoint: `train` finds it and does nothing
        checkpoint = root / "runs" / "movielens-100k" / "model.pt"
        checkpoint.parent.mkdir(parents=True)
        tiny_checkpoint(checkpoint)
        (root / "data").mkdir(parents=True)
        for f in cache.glob("MovieLens100k_*"):
            shutil.copy(f, root / "data" / f.name)
        try:
            train = start("train")
            assert train.process.wait(120) == 0, train.output()[-3000:]
            trainer = start("trainer")
            wait_for(lambda: http_get(trainer.url + "/healthz")[0] == 200, TIMEOUT_S, None,
                     "the trainer to be healthy")
            workers = [start("worker", i) for i in range(int(env["WORKER_REPLICAS"]))]
            producer = start("producer")
            monitor = start("monitor")
            yield {"config": config, "trainer": trainer, "workers": workers,
                   "producer": producer, "monitor": monitor, "root": root, "env": env}
        finally:
            for running in started:
                running.stop(signal.SIGKILL)


def owning(worker: Service) -> set[int] | None:
    lines = re.findall(r"owning \[(.*)\]", worker.output())
    return None if not lines else {int(p) for p in re.findall(r"\[(\d+)\]", lines[-1])}


def model_version(service: Service) -> int | None:
    status, body = http_get(service.url + "/healthz")
    match = re.search(rb'"model_version":\s*(\d+)', body)
    return int(match[1]) if status == 200 and match else None


def stored_users(root: Path) -> set[str]:
    users: set[str] = set()
    for slot in sorted((root / "worker-state").glob("slot-*")):
        if (slot / "CURRENT").exists():
            with StateStore.open(slot, read_only=True) as store:
                users |= {r.user_id for r in store.iter_users()}
    return users


@pytest.mark.broker
def test_the_compose_stack_runs_as_local_processes(stack: dict[str, Any]) -> None:
    workers: list[Service] = stack["workers"]
    trainer: Service = stack["trainer"]
    token = trainer.token
    partitions = int(stack["env"]["PARTITIONS"])
    assert len(workers) == 2

    def split() -> bool:
        owned = [owning(w) for w in workers]
        return all(owned) and set().union(*owned) == set(range(partitions)) \
            and not owned[0] & owned[1]  # type: ignore[operator]

    for w in workers:
        assert w.exited() is None, w.output()[-3000:]
    wait_for(split, TIMEOUT_S, None, "the two replicas to split the partitions")
    slots = [re.findall(r"slot-(\d+)", " ".join(w.extra["argv"])) for w in workers]
    assert slots == [[], []], "the slot is chosen by claim_slot at run time, not by the test"
    wait_for(lambda: len(stored_users(stack["root"])) >= 20, TIMEOUT_S, None,
             "events applied by the workers")

    # Every user's state is answered by its owner; the other replica redirects to it.
    owned = {i: owning(w) or set() for i, w in enumerate(workers)}
    users = sorted(stored_users(stack["root"]))[:60]
    for user in users:
        p = partition_of(user, partitions)
        owner = next(i for i, ps in owned.items() if p in ps)
        other = 1 - owner
        snapshot = fetch_state(workers[owner].url, user, token=token)
        assert snapshot["partition"] == p and snapshot["offset"] > 0
        assert fetch_state(workers[other].url, user, token=token)["partition"] == p
        req = f"{workers[other].url}/users/{user}/state"
        status, body = _get(req, token)
        assert status == 421 and workers[owner].url.encode() in body, (status, body)

    # The trainer's model version reaches both workers.
    wait_for(lambda: model_version(trainer) is not None
             and all(model_version(w) == model_version(trainer) for w in workers),
             TIMEOUT_S, None, "both workers to serve the trainer's version")
    versions = sorted(p.name for p in (stack["root"] / "model-versions").iterdir())
    assert versions, "the trainer published into the model-versions volume"

    # The monitor aggregates the workers' feedback across the fleet.
    monitor: Service = stack["monitor"]

    def fleet_feedback() -> int:
        status, body = http_get(monitor.url + "/fleet/drift")
        match = re.search(rb'"records_consumed":\s*(\d+)', body)
        return int(match[1]) if status == 200 and match else 0

    wait_for(lambda: fleet_feedback() > 0, TIMEOUT_S, None, "the monitor to see feedback")
    assert monitor.exited() is None, monitor.output()[-3000:]

    # Killing one replica moves its partitions to the other, through the changelog.
    victim, survivor = workers[1], workers[0]
    lost = owned[1]
    victim.stop(signal.SIGKILL)
    wait_for(lambda: owning(survivor) == set(range(partitions)), TIMEOUT_S, None,
             "the survivor to own every partition")
    text = survivor.output()
    for p in lost:
        assert re.search(rf"restored \S+\[{p}\] \(restored\)", text), text[-3000:]
    for user in users:
        assert fetch_state(survivor.url, user, token=token)["user_id"] == user

    stack["producer"].stop()


def _get(url: str, token: str) -> tuple[int, bytes]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(urllib.request.Request(
                url, headers={"Authorization": f"Bearer {token}"}), timeout=10) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_prometheus_scrapes_every_port_the_services_serve() -> None:
    config = compose_config(compose_env())
    scrape = yaml.safe_load(PROMETHEUS.read_text())["scrape_configs"]
    targets = {(name, sd["port"]) for job in scrape for sd in job.get("dns_sd_configs", [])
               for name in sd["names"]}
    targets |= {(host, int(port)) for job in scrape for sc in job.get("static_configs", [])
                for host, port in (t.rsplit(":", 1) for t in sc["targets"])}
    served = 0
    for name, service in config["services"].items():
        command = [str(a) for a in service.get("command") or []]
        if "--web-port" not in command:
            continue
        port = int(command[command.index("--web-port") + 1])
        published = {int(str(p).rsplit(":", 1)[-1]) for p in service.get("ports", [])}
        assert not published or published == {port}, (name, published, port)
        alias = name
        for net in (service.get("networks") or {}).values():
            alias = (net or {}).get("aliases", [name])[0]
        assert (alias, port) in targets, f"{name} serves :{port} but Prometheus does not scrape it"
        served += 1
    assert served >= 3  # the workers, the trainer and the monitor
