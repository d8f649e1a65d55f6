"""Keeps a batch's offsets unacked while its processing fails, whatever the failure.

faust-streaming acks an event whose agent raised and restarts the agent, so an
exception would silently drop the batch (FINDINGS.md). Transient faults are
retried inside the bridges; anything that still escapes (a missing table after
a bad deploy, a bug) is retried here (:data:`inferstream.retrying.AGENT_BATCH`)
and logged with its traceback each time, so the partition stalls visibly instead
of losing data.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from tenacity import RetryCallState

from inferstream.retrying import AGENT_BATCH, any_error, failure
from streams.agents import metrics

log = logging.getLogger(__name__)


async def until_done(agent: str, work: Callable[[], Awaitable[None]]) -> None:
    def stalled(state: RetryCallState) -> None:
        metrics.STALLS.labels(agent).inc()
        log.error(
            "%s: batch failed (attempt %d); retrying, offsets held",
            agent, state.attempt_number, exc_info=failure(state),
        )  # fmt: skip

    async for attempt in AGENT_BATCH.retrying(any_error, before_sleep=stalled):
        with attempt:
            await work()
