"""The log's topics: requests and results, both keyed by ``user_id`` (JSON-encoded, like table keys)."""

from __future__ import annotations

from dataclasses import dataclass

import faust

from inferstream.settings import Settings
from schemas.records import InferenceRequest, ResultEvent


@dataclass(frozen=True)
class Topics:
    requests: faust.TopicT
    results: faust.TopicT


def define_topics(app: faust.App, settings: Settings) -> Topics:
    requests = app.topic(
        settings.requests_topic,
        key_type=str,
        value_type=InferenceRequest,
        key_serializer="json",
        partitions=settings.partitions,
    )
    results = app.topic(
        settings.results_topic,
        key_type=str,
        value_type=ResultEvent,
        key_serializer="json",
        partitions=settings.partitions,
    )
    return Topics(requests=requests, results=results)
