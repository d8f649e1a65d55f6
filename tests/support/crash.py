"""A crash matrix under load: kill -9 worker processes mid-load, restart them, then check every guarantee.

One :class:`CrashRun` is one stack (one namespace): pipeline workers and ML-only
workers as real processes, a load of ``generate`` submissions from several
users at a steady rate, and a list of :class:`Kill` faults fired at given
fractions of the load. Each killed process is started again at once on its
port. Afterwards :meth:`CrashRun.verify` waits for every accepted request to
reach a terminal row and returns a :class:`Outcome` with what the README's
faults table reports. Used by ``tests/e2e/test_crash_matrix.py`` and
``bench/faults.py``.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from tests.support.pipeline import Api, Pipeline, WorkerProcess
from tests.support.wait import wait_for

TERMINAL = ("completed", "failed", "cancelled", "expired")


@dataclass(frozen=True)
class Kill:
    """Signal the named processes when ``at`` (0..1) of the load has been sent (kill -9 by default, or a
    graceful SIGTERM), wait for them to exit, and start them again at once on the same ports."""

    at: float
    targets: tuple[str, ...]
    sig: int = signal.SIGKILL

    @property
    def label(self) -> str:
        if self.targets == (RABBITMQ,):
            return "RabbitMQ restarted"
        how = "kill -9" if self.sig == signal.SIGKILL else signal.Signals(self.sig).name
        return f"{how} {'+'.join(self.targets)}"


RABBITMQ = "rabbitmq"  # a Kill target: the machine's RabbitMQ, restarted with rabbitmqctl stop_app / start_app


async def restart_rabbitmq(timeout: float = 120.0) -> None:
    """Stop and start the RabbitMQ application (the node's queues and persistent messages survive)."""
    for args in (("stop_app",), ("start_app",), ("await_startup",)):
        proc = await asyncio.create_subprocess_exec(
            "rabbitmqctl", *args, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
        )
        await asyncio.wait_for(proc.wait(), timeout)
        assert proc.returncode == 0, f"rabbitmqctl {args[0]} failed with {proc.returncode}"


@dataclass
class Outcome:
    accepted: int = 0
    completed: int = 0
    failed: int = 0
    stranded: list[str] = field(default_factory=list)
    duplicates: int = 0
    refused: int = 0
    in_doubt: int = 0
    quota_mismatches: list[str] = field(default_factory=list)
    stale_reads: list[str] = field(default_factory=list)  # GET (Redis first) disagreeing with the terminal row
    recover_s: list[float] = field(default_factory=list)
    statuses: Counter[str] = field(default_factory=Counter)

    @property
    def ok(self) -> bool:
        return not (self.stranded or self.duplicates or self.quota_mismatches or self.stale_reads)


class CrashRun:
    """Roles by name: ``{"p1": "pipeline", "m1": "ml", "all": "pipeline,ml"}``; clients talk to pipeline workers."""

    def __init__(self, pipeline: Pipeline, roles: dict[str, str], *, users: int = 10) -> None:
        self.pipeline = pipeline
        self.roles = roles
        self.users = users
        self.workers: dict[str, WorkerProcess] = {}
        self.keys: dict[str, str] = {}
        self.accepted: dict[str, str] = {}  # request id -> user
        self.tally: Counter[str] = Counter()
        self.recover_s: list[float] = []
        self._restarts: dict[str, asyncio.Task[None]] = {}

    async def start(self) -> None:
        await self.pipeline.set_plan("crash", requests_per_day=10**6, tokens_per_day=10**9)
        for user in range(self.users):
            self.keys[f"u{user}"] = await self.pipeline.create_key(f"u{user}", "crash")
        started = [self.pipeline.start_worker(wait=False, roles=r) for r in self.roles.values()]
        for name, worker in zip(self.roles, await asyncio.gather(*started), strict=True):
            self.workers[name] = worker
        await asyncio.gather(*(w.wait_ready(120) for w in self.workers.values()))

    def _gateways(self) -> list[WorkerProcess]:
        return [w for n, w in self.workers.items() if "pipeline" in self.roles[n]]

    async def _restart(self, name: str, killed_at: float) -> None:
        old = self.workers[name]
        worker = await self.pipeline.start_worker(wait=False, web_port=str(old.port), roles=self.roles[name])
        self.workers[name] = worker
        await worker.wait_ready(180)
        self.recover_s.append(time.monotonic() - killed_at)

    async def _restart_service(self, killed_at: float) -> None:
        await restart_rabbitmq()
        self.recover_s.append(time.monotonic() - killed_at)

    async def _kill(self, kill: Kill) -> None:
        if kill.targets == (RABBITMQ,):
            self._restarts[RABBITMQ] = asyncio.ensure_future(self._restart_service(time.monotonic()))
            return
        # A process still restarting from an earlier kill is killed once it is back.
        await asyncio.gather(*(self._restarts[n] for n in kill.targets if n in self._restarts))
        now = time.monotonic()
        # In threads: a graceful stop takes seconds, and the load must go on meanwhile.
        await asyncio.gather(*(asyncio.to_thread(self.workers[n].kill, kill.sig) for n in kill.targets))
        for name in kill.targets:
            self._restarts[name] = asyncio.ensure_future(self._restart(name, now))

    async def load(self, total: int, rate: float, kills: list[Kill]) -> None:
        """Send ``total`` submissions at ``rate``/s round-robin over users and gateways, firing ``kills``."""
        pending = sorted(kills, key=lambda k: k.at)
        users = list(self.keys)
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=30)
        ) as http:
            sent: list[asyncio.Task[None]] = []
            started = time.monotonic()
            for i in range(total):
                while pending and i >= pending[0].at * total:
                    await self._kill(pending.pop(0))
                sent.append(asyncio.ensure_future(self._submit(http, users[i % len(users)], i)))
                # Pacing the load generator, not synchronisation.
                await asyncio.sleep(max(0.0, started + (i + 1) / rate - time.monotonic()))
            await asyncio.gather(*sent)
        await asyncio.gather(*self._restarts.values())

    async def _submit(self, http: aiohttp.ClientSession, user: str, i: int) -> None:
        payload = {"task": "generate", "input": f"crash load {i}", "params": {"max_tokens": 8}}
        # Like a load balancer: a gateway that refuses the connection is skipped for the next one.
        gateways = self._gateways()
        for attempt in range(len(gateways)):
            api = Api(http, gateways[(i + attempt) % len(gateways)].url, self.keys[user])
            try:
                status, body, _ = await api.submit(payload)
            except aiohttp.ClientConnectorError:
                continue
            except (TimeoutError, aiohttp.ClientError):
                self.tally["in_doubt"] += 1  # sent, answer lost: may or may not be admitted
                return
            if status == 202:
                self.accepted[body["request_id"]] = user
            else:
                self.tally[f"http_{status}"] += 1
                self.tally["refused"] += 1
            return
        self.tally["refused"] += 1  # no gateway reachable: certainly not admitted

    async def verify(self, timeout: float = 180.0) -> Outcome:
        """Wait for every accepted request to be terminal (or the deadline), then check the guarantees."""
        schema = self.pipeline.settings.db_schema
        pool = await self.pipeline.store.connect()
        ids = set(self.accepted)

        async def rows() -> list[Any]:
            # Every request in the log has a row: the accepted ones and any whose answer was lost (in doubt).
            return list(await pool.fetch(f'SELECT request_id, user_id, status, usage FROM "{schema}".requests'))

        async def all_terminal() -> bool:
            current = [r for r in await rows() if r["request_id"] in ids]
            return len(current) == len(ids) and all(r["status"] in TERMINAL for r in current)

        try:
            await wait_for(all_terminal, timeout=timeout, interval=0.5, what="every accepted request terminal")
        except AssertionError:
            pass  # reported as stranded below
        final = await rows()
        out = Outcome(accepted=len(ids), refused=self.tally["refused"], in_doubt=self.tally["in_doubt"])
        out.recover_s = sorted(self.recover_s)
        by_id = {r["request_id"]: r for r in final}
        out.statuses = Counter(r["status"] for r in final if r["request_id"] in ids)
        out.completed, out.failed = out.statuses["completed"], out.statuses["failed"]
        out.stranded = sorted(i for i in ids if i not in by_id or by_id[i]["status"] not in TERMINAL)
        await self._check_quota(out, final)
        await self._check_reads(out, by_id)
        return out

    async def _check_reads(self, out: Outcome, by_id: dict[str, Any]) -> None:
        """What a client sees (GET reads the Redis cache first) must be the stored terminal status."""
        gateway = self._gateways()[0]
        async with aiohttp.ClientSession() as http:
            apis = {user: Api(http, gateway.url, key) for user, key in self.keys.items()}
            for request_id, user in self.accepted.items():
                status, doc, _ = await apis[user].get(request_id)
                row = by_id.get(request_id)
                if status != 200 or row is None or doc["status"] != row["status"]:
                    seen = doc.get("status") if isinstance(doc, dict) else status
                    out.stale_reads.append(f"{request_id}: GET {seen}, row {row['status'] if row else None}")

    async def _check_quota(self, out: Outcome, final: list[Any], timeout: float = 60.0) -> None:
        """Each logged request charged once, each completed one its actual tokens once, nothing left reserved.

        Polled until it holds or ``timeout``: a reservation orphaned by a crash
        (charged, request never logged) is released by the owner's sweep a few
        seconds after it can be told apart from a slow admission.
        """
        logged: Counter[str] = Counter(r["user_id"] for r in final)
        used_tokens: Counter[str] = Counter()
        for r in final:
            if r["status"] == "completed" and r["usage"]:
                usage = r["usage"]  # jsonb, decoded by the store's codec
                used_tokens[r["user_id"]] += int(usage.get("total_tokens") or 0)
        admitted: Counter[str] = Counter(self.accepted.values())
        gateway = self._gateways()[0]
        mismatches: list[str] = []
        duplicates = 0

        async def agrees() -> bool:
            nonlocal duplicates
            mismatches.clear()
            duplicates = 0
            async with aiohttp.ClientSession() as http:
                for user, key in self.keys.items():
                    status, doc, _ = await Api(http, gateway.url, key).call("GET", "/v1/quota")
                    if status != 200:
                        mismatches.append(f"{user}: GET /v1/quota answered {status}")
                        continue
                    requests, tokens = doc["requests"]["used"], doc["tokens"]
                    duplicates += max(0, requests - logged[user])  # charged more than once
                    if requests != logged[user] or logged[user] < admitted[user]:
                        mismatches.append(
                            f"{user}: requests used {requests}, in the log {logged[user]}, answered 202 {admitted[user]}"
                        )
                    if tokens["used"] != used_tokens[user] or tokens["reserved"] != 0:
                        mismatches.append(
                            f"{user}: tokens used {tokens['used']} reserved {tokens['reserved']}, "
                            f"completed rows used {used_tokens[user]}"
                        )
            return not mismatches

        try:
            await wait_for(agrees, timeout=timeout, interval=1.0, what="quota to agree with the log")
        except AssertionError:
            pass  # reported below
        out.quota_mismatches, out.duplicates = list(mismatches), duplicates
