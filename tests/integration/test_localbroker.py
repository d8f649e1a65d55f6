"""The local Tansu launcher: real process, real Kafka clients, clean stop."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from devtools.localbroker import (
    HOST,
    BrokerError,
    LocalBroker,
    free_port,
    is_ready,
    port_is_free,
    probe,
)
from tests.support.wait import wait_for

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[LocalBroker]:
    with LocalBroker(logfile=tmp_path / "tansu.log") as running:
        yield running


async def test_produce_and_consume_then_stop_frees_the_port(tmp_path: Path) -> None:
    broker = LocalBroker(logfile=tmp_path / "tansu.log")
    url = broker.start()
    assert url == f"kafka://{HOST}:{broker.port}"
    assert broker.port is not None
    port = broker.port
    try:
        broker.wait_ready(timeout=20)
        bootstrap = f"{HOST}:{port}"
        topic = f"t{uuid.uuid4().hex[:8]}.probe"
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])
        finally:
            await admin.close()
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
        await producer.start()
        try:
            await producer.send_and_wait(topic, b"hello", key=b"k")
        finally:
            await producer.stop()
        consumer = AIOKafkaConsumer(
            topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", group_id=None
        )
        await consumer.start()
        try:
            message = await asyncio.wait_for(consumer.getone(), timeout=15)
        finally:
            await consumer.stop()
        assert (message.key, message.value) == (b"k", b"hello")
    finally:
        broker.stop()
    assert broker.process is None
    await wait_for(lambda: port_is_free(port), timeout=10, what=f"port {port} free after stop()")
    assert "listening on" in (tmp_path / "tansu.log").read_text()


def test_probe_reports_the_advertised_listener(broker: LocalBroker) -> None:
    assert broker.port is not None
    assert probe(HOST, broker.port) == (HOST, broker.port)


def test_a_listening_socket_that_is_not_kafka_is_not_ready() -> None:
    # Something that accepts and hangs up: a plain connect check would call it ready.
    server = socket.create_server((HOST, 0))
    server.settimeout(5)
    port = server.getsockname()[1]
    try:
        assert not is_ready(HOST, port, timeout=0.5)
    finally:
        server.close()


def test_start_refuses_a_taken_port(broker: LocalBroker, tmp_path: Path) -> None:
    # The broker already there would answer the readiness probe for the new one.
    with pytest.raises(BrokerError, match="in use"):
        LocalBroker(logfile=tmp_path / "second.log").start(broker.port)


def test_wait_ready_reports_an_early_exit(tmp_path: Path) -> None:
    broker = LocalBroker(logfile=tmp_path / "tansu.log")
    broker.start()
    assert broker.process is not None
    broker.process.kill()
    broker.process.wait()
    with pytest.raises(BrokerError, match="exited"):
        broker.wait_ready(timeout=5)
    broker.stop()


def test_stop_is_idempotent(tmp_path: Path) -> None:
    broker = LocalBroker(logfile=tmp_path / "tansu.log")
    broker.start()
    broker.stop()
    broker.stop()
    assert broker.pid is None


async def test_cli_start_status_stop(tmp_path: Path) -> None:
    port = free_port()
    pidfile = tmp_path / "broker.pid"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "devtools.localbroker", *args],
            capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path,
        )  # fmt: skip

    started = cli("start", "--port", str(port), "--pidfile", str(pidfile), "--logfile", "b.log")
    try:
        assert started.returncode == 0, started.stderr
        assert "memory only" in started.stdout and "Apache Kafka or Redpanda" in started.stdout
        assert cli("status", "--port", str(port)).returncode == 0
        assert (
            cli("start", "--port", str(port), "--pidfile", str(tmp_path / "x.pid")).returncode == 1
        )
    finally:
        stopped = cli("stop", "--pidfile", str(pidfile))
    assert stopped.returncode == 0 and "stopped" in stopped.stdout
    assert not pidfile.exists()
    await wait_for(lambda: port_is_free(port), timeout=10, what=f"port {port} free after stop")
    assert cli("status", "--port", str(port)).returncode == 1
