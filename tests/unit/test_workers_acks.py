"""Acks coalesced per tick: ``multiple=True`` never covers an unfinished delivery; nacks and rejects keep their meaning."""

from __future__ import annotations

import asyncio
import random

import pytest

from workers.acks import Acks


class Broker:
    """RabbitMQ's bookkeeping of one channel: what is outstanding, and what each frame settled."""

    def __init__(self) -> None:
        self.outstanding: set[int] = set()
        self.finished: set[int] = set()  # the test's truth: deliveries whose work is done
        self.acked: set[int] = set()
        self.requeued: set[int] = set()
        self.rejected: set[int] = set()
        self.frames: list[tuple[str, int, bool]] = []
        self.is_closed = False

    def settle(self, kind: str, tag: int, multiple: bool) -> set[int]:
        self.frames.append((kind, tag, multiple))
        if tag not in self.outstanding:  # RabbitMQ closes the channel: PRECONDITION_FAILED
            raise AssertionError(f"{kind} of unknown delivery tag {tag}")
        covered = {t for t in self.outstanding if t <= tag} if multiple else {tag}
        self.outstanding -= covered
        return covered


class Message:
    def __init__(self, broker: Broker, tag: int) -> None:
        self.broker = broker
        self.delivery_tag = tag
        self.message_id = f"m{tag}"
        broker.outstanding.add(tag)

    @property
    def channel(self) -> Broker:
        if self.broker.is_closed:
            raise RuntimeError("channel closed")
        return self.broker

    async def ack(self, multiple: bool = False) -> None:
        await asyncio.sleep(0)  # the frame is written later, as aiormq's writer does
        covered = self.channel.settle("ack", self.delivery_tag, multiple)
        unfinished = covered - self.broker.finished
        assert not unfinished, (
            f"ack({self.delivery_tag}, multiple={multiple}) covered unfinished {unfinished}"
        )
        self.broker.acked |= covered

    async def nack(self, requeue: bool = True) -> None:
        await asyncio.sleep(0)
        self.broker.requeued |= self.channel.settle("nack", self.delivery_tag, False)

    async def reject(self, requeue: bool = False) -> None:
        await asyncio.sleep(0)
        self.broker.rejected |= self.channel.settle("reject", self.delivery_tag, False)


def deliver(acks: Acks, broker: Broker, tags: range) -> dict[int, Message]:
    messages = {t: Message(broker, t) for t in tags}
    for m in messages.values():
        acks.delivered(m)  # type: ignore[arg-type]
    return messages


async def test_acks_finished_in_one_tick_share_one_multiple_frame() -> None:
    broker, acks = Broker(), Acks()
    messages = deliver(acks, broker, range(1, 9))
    broker.finished |= set(range(1, 9))
    await asyncio.gather(*(acks.ack(m) for m in messages.values()))  # type: ignore[arg-type]
    assert broker.acked == set(range(1, 9)) and not broker.outstanding
    assert broker.frames == [("ack", 8, True)]


async def test_an_unfinished_earlier_delivery_is_never_covered() -> None:
    broker, acks = Broker(), Acks()
    messages = deliver(acks, broker, range(1, 7))
    broker.finished |= {1, 2, 4, 5}  # 3 and 6 still running
    await asyncio.gather(*(acks.ack(messages[t]) for t in (1, 2, 4, 5)))  # type: ignore[arg-type]
    assert broker.acked == {1, 2, 4, 5} and broker.outstanding == {3, 6}
    assert ("ack", 2, True) in broker.frames
    assert {f for f in broker.frames if f[1] in (4, 5)} == {("ack", 4, False), ("ack", 5, False)}
    # 3 finishes: 4 and 5 were acked alone, so the watermark passes them without naming them again.
    broker.finished.add(3)
    await acks.ack(messages[3])  # type: ignore[arg-type]
    assert broker.frames[-1] == ("ack", 3, False) and broker.outstanding == {6}
    broker.finished.add(6)
    await acks.ack(messages[6])  # type: ignore[arg-type]
    assert not broker.outstanding and acks.unsettled == 0


async def test_nacks_and_rejects_keep_their_meaning_and_are_never_acked() -> None:
    broker, acks = Broker(), Acks()
    messages = deliver(acks, broker, range(1, 6))
    await acks.settle_now(messages[2], requeue=True)  # type: ignore[arg-type]
    await acks.settle_now(messages[3], reject=True)  # type: ignore[arg-type]
    broker.finished |= {1, 4, 5}
    await asyncio.gather(*(acks.ack(messages[t]) for t in (1, 4, 5)))  # type: ignore[arg-type]
    assert broker.requeued == {2} and broker.rejected == {3} and broker.acked == {1, 4, 5}
    assert ("ack", 5, True) in broker.frames  # 2 and 3 settled already: the watermark passes them
    assert not broker.outstanding


@pytest.mark.parametrize("seed", range(30))
async def test_random_finishing_orders_never_ack_an_unfinished_delivery(seed: int) -> None:
    rng = random.Random(seed)
    broker, acks = Broker(), Acks()
    n = 60
    messages = deliver(acks, broker, range(1, n + 1))
    order = list(messages)
    rng.shuffle(order)

    async def finish(tag: int) -> None:
        await asyncio.sleep(rng.random() * 0.002)
        fate = rng.random()
        if fate < 0.1:
            await acks.settle_now(messages[tag], requeue=True)  # type: ignore[arg-type]
        elif fate < 0.15:
            await acks.settle_now(messages[tag], reject=True)  # type: ignore[arg-type]
        else:
            broker.finished.add(tag)
            await acks.ack(messages[tag])  # type: ignore[arg-type]

    await asyncio.gather(*(finish(t) for t in order))
    assert not broker.outstanding
    assert broker.acked == broker.finished
    assert broker.acked | broker.requeued | broker.rejected == set(messages)
    assert len([f for f in broker.frames if f[0] == "ack"]) <= len(broker.acked)


async def test_a_new_channel_starts_over_and_acks_of_the_old_one_fail_quietly() -> None:
    old, acks = Broker(), Acks()
    stale = deliver(acks, old, range(1, 3))
    old.is_closed = True  # the robust connection reopened the channel: tags start at 1 again
    new = Broker()
    fresh = deliver(acks, new, range(1, 3))
    new.finished |= {1, 2}
    old.finished |= {1, 2}
    await asyncio.gather(
        *(acks.ack(m) for m in [*stale.values(), *fresh.values()])  # type: ignore[arg-type]
    )
    assert new.acked == {1, 2} and not new.outstanding
    assert old.acked == set()  # the broker requeued those when the channel closed
