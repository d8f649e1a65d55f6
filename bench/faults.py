"""The faults table: kill -9 worker processes under load, restart them at once, and check every guarantee.

Starts its own Tansu broker and model server (simulated generator at
``--latency-ms``), then one stack per scenario (a fresh namespace), sends
generate submissions from 10 users at ``--rate``/s for the scenario's time, fires the
scenario's kills, and prints one row per scenario: accepted, completed,
stranded, duplicates, refused during the fault, and restart-to-ready.

    .venv/bin/python -m bench.faults [--rate 100] [--scenarios all-in-one,split]
    .venv/bin/python -m bench.faults --restart-to-ready     # kill -9 -> ready, 6 s vs default session timeout
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import time

from devtools.localbroker import LocalBroker
from tests.support.crash import RABBITMQ, CrashRun, Kill, Outcome
from tests.support.modelserver import running_modelserver
from tests.support.pipeline import Pipeline

SCENARIOS: dict[str, tuple[dict[str, str], list[Kill], float]] = {
    # The case: one worker with every role, killed half-way (load seconds x --rate).
    "all-in-one": ({"all": "pipeline,ml"}, [Kill(0.5, ("all",))], 3.0),
    # The broker of the work queues restarted under load (durable queues, persistent messages, confirms).
    "rabbitmq": ({"p1": "pipeline", "m1": "ml"}, [Kill(0.3, (RABBITMQ,))], 10.0),
    # A graceful stop (rolling restart) mid-load.
    "all-in-one-term": ({"all": "pipeline,ml"}, [Kill(0.5, ("all",), signal.SIGTERM)], 4.0),
    # The same worker killed three times during a longer load.
    "all-in-one-3x": ({"all": "pipeline,ml"}, [Kill(0.25, ("all",)), Kill(0.5, ("all",)), Kill(0.75, ("all",))], 12.0),
    # Two pipeline workers and an ML-only worker: the ML worker, then a pipeline worker, then both kinds at once.
    "split": (
        {"p1": "pipeline", "p2": "pipeline", "m1": "ml"},
        [Kill(0.2, ("m1",)), Kill(0.45, ("p1",)), Kill(0.7, ("p2", "m1"))],
        20.0,
    ),
}


def row(name: str, kills: list[Kill], total: int, rate: float, out: Outcome) -> str:
    faults = ", ".join(f"{k.label} at {int(k.at * 100)}%" for k in kills)
    recover = ", ".join(f"{s:.1f}" for s in out.recover_s)
    return (
        f"| {name}: {faults} | {total} at {rate:.0f}/s | {out.accepted} | {out.completed} "
        f"(+{out.failed} failed) | {len(out.stranded)} stranded, {out.duplicates} duplicates | "
        f"{out.refused} refused, {out.in_doubt} in doubt | {recover} s |"
    )


async def scenario(broker: str, model: str, name: str, rate: float) -> str:
    roles, kills, seconds = SCENARIOS[name]
    total = int(seconds * rate)
    async with Pipeline.session(broker, model) as pipeline:
        run = CrashRun(pipeline, roles)
        await run.start()
        await run.load(total, rate, kills)
        out = await run.verify()
        if not out.ok:
            print(f"  {name}: stranded {out.stranded[:5]} quota {out.quota_mismatches[:4]} "
                  f"stale reads {out.stale_reads[:4]} statuses {dict(out.statuses)}")
        return row(name, kills, total, rate, out)


async def restart_to_ready(broker: str, model: str) -> None:
    for timeout in ("6", "60"):
        async with Pipeline.session(broker, model, session_timeout_s=timeout) as pipeline:
            worker = await pipeline.start_worker()
            worker.kill()
            killed = time.monotonic()
            again = await pipeline.start_worker(wait=False, web_port=str(worker.port))
            await again.wait_ready(240)
            print(f"session timeout {timeout} s: kill -9 -> restarted worker ready in {time.monotonic() - killed:.1f} s")


async def main(args: argparse.Namespace) -> None:
    with LocalBroker() as broker:
        async with running_modelserver("--no-embeddings", "--latency-ms", str(args.latency_ms)) as url:
            if args.restart_to_ready:
                await restart_to_ready(broker.url, url + "/v1")
                return
            print(f"model latency {args.latency_ms} ms; one stack per scenario")
            print("| fault | load | accepted | completed | lost or duplicated | refused during the fault | restart to ready |")
            print("|---|---|---|---|---|---|---|")
            for name in args.scenarios.split(","):
                if name not in SCENARIOS:
                    raise SystemExit(f"unknown scenario {name!r}; known: {', '.join(SCENARIOS)}")
                print(await scenario(broker.url, url + "/v1", name, args.rate), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--latency-ms", type=int, default=50)
    parser.add_argument("--scenarios", default="all-in-one,split,all-in-one-term,rabbitmq")
    parser.add_argument("--restart-to-ready", action="store_true")
    asyncio.run(main(parser.parse_args()))
