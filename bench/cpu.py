"""CPU per completed request, every process of the stack, read from /proc (issue 10, target 1).

Starts its own Tansu broker, model server (generate only, 0 ms) and the
workers of one topology in a fresh namespace, warms them up, then sends
``--requests`` generate requests from 50 users at 64 in flight and waits until
every accepted request is ``completed`` in PostgreSQL. utime+stime of every
process is read from ``/proc/PID/stat`` before the load and after the last
completion: each worker, the model server, Tansu, RabbitMQ (beam.smp),
PostgreSQL (every postgres process, plus the CPU of backends that exited in
between, which the postmaster's cutime/cstime collects), Redis and this load
generator. Prints CPU ms per completed request by process, the total, the
end-to-end and submit rates, and the total against the target and the old
measurement; the bytes Tansu received per completed request (every byte its
clients sent: produces, and also fetch, commit and heartbeat requests;
:mod:`bench.measure`); and a machine calibration (a fixed pure-Python loop
timed in this process before the load) with the total divided by its ratio to
the reference machine (README "Benchmarks").

    .venv/bin/python -m bench.cpu --topology all-in-one [--requests 3000]
    .venv/bin/python -m bench.cpu --topology split
    .venv/bin/python -m bench.cpu --worker-env FETCH_MAX_WAIT_MS=5   # a worker setting, without INFERSTREAM_
    .venv/bin/python -m bench.cpu --profile /tmp/prof   # + py-spy raw profiles of each worker, measured window only
    .venv/bin/python -m bench.cpu --trace   # tracing on: the workers export every span (OTLP/HTTP) to a sink that drops them

``--trace`` sets only the standard variables (``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``,
sampler ``parentbased_always_on``: every request traced) and runs the OTLP
receiver in a process of its own, outside the measured ones (docs/tracing.md).

The topologies are ``TOPOLOGIES`` (label -> ``INFERSTREAM_ROLES``), the default
``DEFAULT_TOPOLOGY``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from bench.measure import (
    Profiles,
    bytes_between,
    calibrate,
    calibration_line,
    slowness,
    statuses_of,
    tcp_bytes,
    wait_terminal,
    worker_settings,
)
from devtools.localbroker import LocalBroker, free_port
from tests.support.modelserver import start_modelserver, stop_modelserver, wait_healthy
from tests.support.pipeline import Api, Pipeline, WorkerProcess

TARGET_MS = 2.0  # issue 10, target 1
OLD_MS = 4.80  # issue 10, the measurement on main (all-in-one)
USERS = 50
IN_FLIGHT = 64
WARMUP = 100
TOPOLOGIES: dict[str, dict[str, str]] = {
    "all-in-one": {"worker (all roles)": "pipeline,ml"},
    "split": {"pipeline worker": "pipeline", "ML worker": "ml"},
}
DEFAULT_TOPOLOGY = "all-in-one"
TICK_MS = 1000.0 / os.sysconf("SC_CLK_TCK")
PROC = Path("/proc")


# An OTLP/HTTP receiver that reads each export and answers 200 with an empty ExportTraceServiceResponse.
DROP_COLLECTOR = """
import http.server, sys
class Drop(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Drop).serve_forever()
"""


def start_drop_collector() -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", DROP_COLLECTOR, str(port)])
    return proc, f"http://127.0.0.1:{port}/v1/traces"


def stat_fields(pid: int | str) -> list[str]:
    """Fields of /proc/PID/stat after the command name (field 3 on is index 0)."""
    raw = (PROC / str(pid) / "stat").read_text()
    return raw[raw.rindex(")") + 2 :].split()


def cpu_ms(pid: int | str) -> float:
    """utime+stime of one process (fields 14, 15), in ms."""
    f = stat_fields(pid)
    return (int(f[11]) + int(f[12])) * TICK_MS


def reaped_ms(pid: int | str) -> float:
    """cutime+cstime (fields 16, 17): the CPU of children that exited and were waited for, in ms."""
    f = stat_fields(pid)
    return (int(f[13]) + int(f[14])) * TICK_MS


def processes() -> dict[int, tuple[str, str]]:
    """Every process now: pid -> (comm, cmdline)."""
    found: dict[int, tuple[str, str]] = {}
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            comm = (entry / "comm").read_text().strip()
            cmdline = (
                (entry / "cmdline")
                .read_bytes()
                .replace(b"\0", b" ")
                .decode(errors="replace")
                .strip()
            )
        except OSError:
            continue  # exited while we looked
        found[int(entry.name)] = (comm, cmdline)
    return found


def parent(pid: int) -> int:
    return int(stat_fields(pid)[1])


def _parent_or_0(pid: int) -> int:
    try:
        return parent(pid)
    except OSError:
        return 0


@dataclass
class Sample:
    """CPU ms by process label at one instant; ``pids`` says which processes a label summed."""

    ms: dict[str, float] = field(default_factory=dict)
    pids: dict[str, list[int]] = field(default_factory=dict)


def sample(known: dict[str, int]) -> Sample:
    """CPU of the known processes (label -> pid) and of the services found by name."""
    out = Sample()
    for label, pid in known.items():
        out.ms[label] = cpu_ms(pid)
        out.pids[label] = [pid]
    procs = processes()
    by_comm: dict[str, list[int]] = {}
    for pid, (comm, _) in procs.items():
        by_comm.setdefault(comm, []).append(pid)
    postgres = by_comm.get("postgres", [])
    # The postmaster is the postgres process whose parent is not postgres; it reaps exited backends.
    postmasters = {p for p in postgres if parent(p) not in postgres}
    services = {
        "RabbitMQ (beam.smp)": by_comm.get("beam.smp", []),
        "PostgreSQL (all processes)": postgres,
        "Redis": by_comm.get("redis-server", []),
    }
    for label, pids in services.items():
        if not pids:
            raise SystemExit(f"no process found for {label}: is the service running?")
        total = 0.0
        for pid in pids:
            try:
                total += cpu_ms(pid)
            except OSError:
                pass  # a backend that exited between listing and reading
        out.ms[label] = total
        out.pids[label] = sorted(pids)
        if label.startswith("PostgreSQL"):
            reaped = "PostgreSQL (backends that exited)"
            out.ms[reaped] = sum(reaped_ms(p) for p in postmasters)
            out.pids[reaped] = sorted(postmasters)
    times = os.times()
    out.ms["load generator"] = (times.user + times.system) * 1000.0
    out.pids["load generator"] = [os.getpid()]
    return out


async def submit_all(
    urls: list[str], keys: list[str], total: int
) -> tuple[list[str], dict[int, int], float, float]:
    """``total`` generate requests, round-robin over users and gateways, IN_FLIGHT at a time.

    Returns the accepted ids, the count by HTTP status, and the first and last submit times.
    """
    accepted: list[str] = []
    statuses: dict[int, int] = {}
    counter = iter(range(total))
    connector = aiohttp.TCPConnector(limit=IN_FLIGHT)
    first = time.monotonic()
    async with aiohttp.ClientSession(connector=connector) as http:

        async def lane() -> None:
            for i in counter:
                body = {
                    "task": "generate",
                    "input": f"cpu bench request {i}",
                    "params": {"max_tokens": 8},
                }
                headers = {"Authorization": f"Bearer {keys[i % len(keys)]}"}
                async with http.post(
                    f"{urls[i % len(urls)]}/v1/requests", json=body, headers=headers
                ) as r:
                    statuses[r.status] = statuses.get(r.status, 0) + 1
                    if r.status == 202:
                        accepted.append((await r.json())["request_id"])
                    else:
                        await r.read()

        await asyncio.gather(*(lane() for _ in range(IN_FLIGHT)))
    return accepted, statuses, first, time.monotonic()


def table(before: Sample, after: Sample, completed: int) -> tuple[list[str], float]:
    lines = ["| process | pids | CPU ms per completed request |", "|---|---|---|"]
    total = 0.0
    for label, end in after.ms.items():
        per = (end - before.ms[label]) / completed
        total += per
        pids = after.pids[label]
        shown = ",".join(map(str, pids)) if len(pids) <= 3 else f"{len(pids)} processes"
        lines.append(f"| {label} | {shown} | {per:.2f} |")
    lines.append(f"| **total** | | **{total:.2f}** |")
    return lines, total


async def main(args: argparse.Namespace) -> None:
    roles = TOPOLOGIES[args.topology]
    calibration = calibrate()  # before anything else runs: this process, idle machine
    collector, collector_url = start_drop_collector() if args.trace else (None, None)
    with LocalBroker() as broker:
        port = free_port()
        model = start_modelserver(port, "--no-embeddings", "--latency-ms", "0")
        try:
            model_url = f"http://127.0.0.1:{port}"
            await wait_healthy(model_url, time.monotonic() + 90, model)
            assert broker.pid is not None and broker.port is not None
            async with Pipeline.session(broker.url, model_url + "/v1") as pipeline:
                await pipeline.set_plan("bench", requests_per_day=10**7, tokens_per_day=10**10)
                keys = [await pipeline.create_key(f"u{u}", "bench") for u in range(USERS)]
                extra = worker_settings(args.worker_env)
                if collector_url is not None:
                    pipeline.env.update(
                        OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=collector_url,
                        OTEL_TRACES_SAMPLER="parentbased_always_on",
                    )
                started = [pipeline.start_worker(wait=False, **{**extra, "roles": r}) for r in roles.values()]
                workers: dict[str, WorkerProcess] = dict(
                    zip(roles, await asyncio.gather(*started), strict=True)
                )
                await asyncio.gather(*(w.wait_ready(120) for w in workers.values()))
                gateways = [w.url for n, w in workers.items() if "pipeline" in roles[n]]
                # Every key in every gateway's key cache before the clock starts.
                async with aiohttp.ClientSession() as http:
                    await asyncio.gather(
                        *(Api(http, g, k).wait_key_active(30) for g in gateways for k in keys)
                    )

                warm, _, _, _ = await submit_all(gateways, keys, WARMUP)
                await wait_terminal(pipeline, len(warm), args.deadline_s)
                await asyncio.sleep(1.0)  # let the sinks' last batches and acks settle

                known = {name: w.proc.pid for name, w in workers.items() if w.proc is not None}
                known |= {"model server": model.pid, "Tansu broker": broker.pid}
                profiled = {n: w.proc.pid for n, w in workers.items() if w.proc is not None}
                with Profiles(args.profile, profiled):
                    sockets, before = tcp_bytes(broker.port), sample(known)
                    ids, statuses, first, last_submit = await submit_all(
                        gateways, keys, args.requests
                    )
                    done = await wait_terminal(pipeline, len(warm) + len(ids), args.deadline_s)
                    after = sample(known)
                    received, sent = bytes_between(sockets, tcp_bytes(broker.port))
                counts = await statuses_of(pipeline, ids)
                children = [
                    p
                    for p in processes()
                    if p not in known.values() and _parent_or_0(p) in known.values()
                ]
                for name, w in workers.items():
                    if w.proc is None or w.proc.poll() is not None:
                        raise SystemExit(f"{name} exited during the run:\n{w.log_tail()}")

            completed = counts.get("completed", 0)
            print(
                f"topology {args.topology}: {args.requests} generate requests, {USERS} users, {IN_FLIGHT} in flight, "
                f"tracing {'on (every request, OTLP/HTTP to a dropping receiver)' if args.trace else 'off'}, "
                f"model 0 ms; answers {dict(sorted(statuses.items()))}; accepted {len(ids)}, "
                f"completed {completed}, statuses in PostgreSQL {counts}"
            )
            if completed == 0:
                raise SystemExit("nothing completed")
            lines, total = table(before, after, completed)
            print("\n".join(lines))
            print(
                f"end to end {completed / (done - first):.0f} requests/s (first submit to last completion "
                f"{done - first:.2f} s); submit {len(ids) / (last_submit - first):.0f}/s"
            )
            print(f"total {total:.2f} ms = {total / TARGET_MS:.2f}x the target ({TARGET_MS} ms), "
                  f"{total / OLD_MS:.2f}x the old measurement ({OLD_MS} ms)")  # fmt: skip
            print(
                f"Tansu received {received / completed:,.0f} bytes per completed request "
                f"(all its clients' requests, fetch requests included), sent {sent / completed:,.0f}"
            )
            print(calibration_line(calibration))
            print(
                f"total normalised to the reference calibration: {total / slowness(calibration):.2f} ms "
                f"(total / x{slowness(calibration):.2f})"
            )
            if children:
                print(f"NOTE: child processes of measured processes, not counted: {children}")
            if completed < len(ids):
                print(
                    f"WARNING: {len(ids) - completed} accepted requests not completed by the deadline"
                )
        finally:
            stop_modelserver(model)
            if collector is not None:
                collector.terminate()
                collector.wait(10)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--topology", choices=sorted(TOPOLOGIES), default=DEFAULT_TOPOLOGY)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument(
        "--deadline-s", type=float, default=180.0, help="wait this long for completion"
    )
    parser.add_argument(
        "--profile", type=Path, help="py-spy raw profiles of each worker into this directory"
    )
    parser.add_argument(
        "--worker-env", action="append", default=[], metavar="NAME=VALUE",
        help="extra INFERSTREAM_* setting of the workers, without the prefix (e.g. FETCH_MAX_WAIT_MS=5)",
    )  # fmt: skip
    parser.add_argument(
        "--trace", action="store_true",
        help="tracing on in the workers (OTEL_* only), exporting to a local receiver that drops the spans",
    )  # fmt: skip
    asyncio.run(main(parser.parse_args()))
