"""CPU per record of Faust's send path: Faust's own app against ours (streams.quirks.started_producer).

Starts a Tansu broker and sends ``--records`` JSON records through ``Topic.send`` in
groups of ``--group`` (each group sent, then its acks awaited: what the results
bridge and the agents do), once with a plain ``faust.App`` and once with
:class:`streams.application.InferstreamApp`, alternating ``--rounds`` times in one
process. Prints, per run, the CPU time per record of this process (the sender and
the event loop run here), records per second and the number of produce requests the
producer sent (aiokafka's sender counts nothing itself: the count is of
``SendProduceReqHandler`` calls, wrapped for the run), then the ratio of the means.

    .venv/bin/python -m bench.faust_send [--records 20000] [--group 100] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import faust
from aiokafka.producer import sender as aiokafka_sender

from devtools.localbroker import LocalBroker
from streams.application import InferstreamApp


class Event(faust.Record, serializer="json", namespace="bench.faust_send"):
    request_id: str
    user_id: str
    status: str
    usage: dict[str, int]


class ProduceRequests:
    """Counts the produce requests aiokafka's sender builds while installed."""

    def __init__(self) -> None:
        self.count = 0
        self._original: Any = aiokafka_sender.SendProduceReqHandler.create_request

    def __enter__(self) -> ProduceRequests:
        original = self._original

        def create_request(handler: Any) -> Any:
            self.count += 1
            return original(handler)

        aiokafka_sender.SendProduceReqHandler.create_request = create_request  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        aiokafka_sender.SendProduceReqHandler.create_request = self._original  # type: ignore[method-assign]


async def run(
    broker_url: str, app_class: type[faust.App], records: int, group: int, run_id: int
) -> tuple[float, float, int]:
    app = app_class(
        f"bench-faust-send-{run_id}",
        broker=broker_url,
        value_serializer="json",
        key_serializer="json",
    )
    topic = app.topic(f"bench-faust-send-{run_id}", key_type=str, value_type=Event, partitions=4)
    await app.producer.start()
    try:
        await topic.maybe_declare()
        value = Event(
            request_id="r" * 26,
            user_id="u1",
            status="completed",
            usage={"prompt_tokens": 5, "total_tokens": 21},
        )
        await (await topic.send(key="warm", value=value))
        with ProduceRequests() as requests:
            cpu0, wall0 = time.process_time(), time.perf_counter()
            for start in range(0, records, group):
                pending = [
                    await topic.send(key=f"u{i % 50}", value=value)
                    for i in range(start, min(records, start + group))
                ]
                await asyncio.gather(*pending)
            cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        return 1e6 * cpu / records, records / wall, requests.count
    finally:
        await app.producer.stop()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--group", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    results: dict[str, list[float]] = {"faust.App": [], "InferstreamApp": []}
    with LocalBroker() as broker:
        run_id = 0
        for _ in range(args.rounds):
            for label, cls in (("faust.App", faust.App), ("InferstreamApp", InferstreamApp)):
                run_id += 1
                us, rate, requests = asyncio.run(
                    run(broker.url, cls, args.records, args.group, run_id)
                )
                results[label].append(us)
                print(
                    f"{label:>15}: {us:6.1f} us CPU per record, {rate:8,.0f} records/s, "
                    f"{requests:,} produce requests for {args.records:,} records"
                )
    before = sum(results["faust.App"]) / args.rounds
    after = sum(results["InferstreamApp"]) / args.rounds
    print(
        f"mean CPU per record: {before:.1f} us (faust.App) -> {after:.1f} us (InferstreamApp): x{after / before:.2f}"
    )


if __name__ == "__main__":
    main()
