"""CPU per consumed Kafka event through Faust's consumer path, in one process, against a local Tansu.

Produces ``--records`` ``ResultEvent`` records to a fresh topic, then starts an
:class:`streams.application.InferstreamApp` (as ``build_app`` configures it) with
``--agents`` agents reading that topic through :func:`streams.agents.readahead.read_ahead`
with no work, and measures the process's CPU (all threads: Faust's consumer thread
included) from the first event any agent sees to the last one every agent has acked.

``--rate`` paces a producer in a child process instead (the log is then read live, in
small batches, as in the pipeline), and the child's CPU is not counted.

::

    python -m bench.faust_events [--records 20000] [--agents 2] [--rate 0] [--variant NAME] [--profile FILE]

``--variant stock`` is Faust as shipped; ``before`` is InferstreamApp without
:func:`streams.application.lean_consumer_path`; ``app`` (the default) with it, as ``build_app`` makes it.
Prints one line: us of CPU per consumed event (per record, every agent) and events/s.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import multiprocessing
import sys
import time
import uuid
from typing import Any

import faust
import mode.loop

from devtools.localbroker import LocalBroker
from schemas.records import ResultEvent
from streams.agents.readahead import read_ahead
from streams.application import InferstreamApp, lean_consumer_path

PARTITIONS = 4


def event(i: int) -> ResultEvent:
    return ResultEvent(
        request_id=f"req-{i:020d}",
        user_id=f"user-{i % 50}",
        status="completed",
        at=time.time(),
        task="generate",
        model="sim-gpt",
        estimated_tokens=64,
        created_at=time.time(),
        quota_day="2026-12-01",
        attempts=1,
        result={"text": "x" * 64},
        usage={"prompt_tokens": 12, "completion_tokens": 40, "total_tokens": 52},
        history=[{"status": "queued", "at": 1.0}, {"status": "completed", "at": 2.0}],
        started_at=time.time(),
        dispatched_at=time.time(),
    )


async def produce(url: str, topic_name: str, records: int, rate: float) -> None:
    app = faust.App(f"mbp-{uuid.uuid4().hex[:6]}", broker=url, key_serializer="json")
    topic = app.topic(topic_name, key_type=str, value_type=ResultEvent, partitions=PARTITIONS)
    await app.producer.start()
    await topic.maybe_declare()
    per_tick = 100 if rate <= 0 else max(1, int(rate / 100))
    start = time.perf_counter()
    for i in range(0, records, per_tick):
        futs = [
            await topic.send(key=f"user-{j % 50}", value=event(j))
            for j in range(i, min(records, i + per_tick))
        ]
        await asyncio.gather(*futs)
        if rate > 0:
            ahead = start + (i + per_tick) / rate - time.perf_counter()
            if ahead > 0:
                await asyncio.sleep(ahead)
    await app.producer.stop()


def produce_in_child(url: str, topic_name: str, records: int, rate: float) -> None:
    asyncio.run(produce(url, topic_name, records, rate))


def make_app(variant: str, url: str, name: str) -> faust.App:
    cls: type[faust.App] = faust.App if variant == "stock" else InferstreamApp
    options = lean_consumer_path() if variant == "app" else {}
    return cls(
        name,
        broker=url,
        autodiscover=False,
        topic_partitions=PARTITIONS,
        broker_session_timeout=6.0,
        broker_heartbeat_interval=1.0,
        consumer_auto_offset_reset="earliest",
        processing_guarantee="at_least_once",
        key_serializer="json",
        value_serializer="json",
        web_enabled=False,
        datadir=f"/tmp/mb-faust-events-{name}",
        **options,
    )


async def consume(
    app: faust.App, topic_name: str, records: int, agents: int, profile: str | None
) -> tuple[float, float]:
    topic = app.topic(topic_name, key_type=str, value_type=ResultEvent, partitions=PARTITIONS)
    seen = [0] * agents
    started: list[float] = []
    done = asyncio.Event()
    prof = cProfile.Profile() if profile else None

    def agent(k: int) -> None:
        async def work(events: list[Any]) -> None:
            if not started:
                started.extend((time.process_time(), time.perf_counter()))
                if prof is not None:
                    prof.enable()
            seen[k] += len(events)
            if all(n >= records for n in seen):
                done.set()

        @app.agent(topic, name=f"reader-{k}", concurrency=1)
        async def reader(stream: faust.StreamT) -> None:
            await read_ahead(stream, f"reader-{k}", work, 500, 0.005, wait_each=k > 0)

    for k in range(agents):
        agent(k)
    await app.start()
    await asyncio.wait_for(done.wait(), 300)
    used, wall = time.process_time() - started[0], time.perf_counter() - started[1]
    if prof is not None:
        prof.disable()
        prof.dump_stats(profile)
    await app.stop()
    return used, wall


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--records", type=int, default=20000)
    parser.add_argument("--agents", type=int, default=2)
    parser.add_argument(
        "--rate",
        type=float,
        default=0.0,
        help="records/s from a child producer (0: a backlog first)",
    )
    parser.add_argument("--variant", default="app", help="stock | before | app")
    parser.add_argument(
        "--profile", default=None, help="write a cProfile of the measured span here"
    )
    parser.add_argument(
        "--loop", default="uvloop", help="uvloop (the pipeline worker's default) | asyncio"
    )
    parser.add_argument(
        "--experiment", default=None, help="a .py file whose apply(app) changes the app first"
    )
    args = parser.parse_args()
    if args.loop == "uvloop":
        mode.loop.use("uvloop")  # as streams.pipeline does for the worker
    with LocalBroker() as broker:
        topic_name = f"mb-events-{uuid.uuid4().hex[:8]}"
        child = None
        if args.rate > 0:
            asyncio.run(
                produce(broker.url, topic_name, 1, 0)
            )  # the topic exists before the consumer subscribes
            child = multiprocessing.get_context("spawn").Process(
                target=produce_in_child, args=(broker.url, topic_name, args.records - 1, args.rate)
            )
        else:
            asyncio.run(produce(broker.url, topic_name, args.records, 0))
        app = make_app(args.variant, broker.url, f"mbc-{uuid.uuid4().hex[:6]}")
        if args.experiment:
            import importlib.util

            spec = importlib.util.spec_from_file_location("experiment", args.experiment)
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            module.apply(app)

        async def run() -> tuple[float, float]:
            if child is not None:
                child.start()
            return await consume(app, topic_name, args.records, args.agents, args.profile)

        loop = asyncio.new_event_loop()
        try:
            used, wall = loop.run_until_complete(run())
        finally:
            loop.close()
        if child is not None:
            child.join()
    consumed = args.records * args.agents
    print(
        f"{args.variant}: {1e6 * used / consumed:.1f} us CPU per consumed event "
        f"({args.records} records x {args.agents} agents, rate {args.rate or 'backlog'}), "
        f"{consumed / wall:.0f} events/s",
        flush=True,
    )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
