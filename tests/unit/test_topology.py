"""Co-partitioning rules of the log's topics (pure logic; the broker side is in tests/e2e/test_topology.py)."""

from __future__ import annotations

import pytest

from inferstream.errors import TopologyError
from inferstream.settings import Settings
from streams.topology import COMPACTED, check_copartitioned, topic_specs

SETTINGS = Settings(namespace="ns", partitions=12)
SPECS = topic_specs(SETTINGS, [("quota", "ns-quota-changelog")])


def test_specs_cover_our_topics_and_the_changelogs_with_the_configured_count() -> None:
    assert [(s.name, s.partitions) for s in SPECS] == [
        ("ns.inference.requests", 12),
        ("ns.inference.results", 12),
        ("ns-quota-changelog", 12),
    ]
    assert SPECS[2].config == COMPACTED and SPECS[0].config == {}


def test_nothing_yet_and_all_agreeing_pass() -> None:
    check_copartitioned(SPECS, {}, "INFERSTREAM_PARTITIONS")
    check_copartitioned(SPECS, dict.fromkeys((s.name for s in SPECS), 12), "INFERSTREAM_PARTITIONS")


def test_a_topic_that_disagrees_with_the_changelog_is_named_with_both_counts() -> None:
    counts = {"ns.inference.requests": 4, "ns-quota-changelog": 12}
    with pytest.raises(TopologyError) as info:
        check_copartitioned(SPECS, counts, "INFERSTREAM_PARTITIONS")
    err = info.value
    assert (err.topic, err.expected, err.actual) == ("ns.inference.requests", 12, 4)
    assert "'ns.inference.requests' has 4 partitions" in str(err)
    assert "'ns-quota-changelog' has 12" in str(err)


def test_existing_topics_that_disagree_with_the_setting_say_which_setting_to_change() -> None:
    counts = {"ns.inference.requests": 4, "ns.inference.results": 4}
    with pytest.raises(TopologyError) as info:
        check_copartitioned(SPECS, counts, "INFERSTREAM_PARTITIONS")
    assert "INFERSTREAM_PARTITIONS=12" in str(info.value)
    assert "set INFERSTREAM_PARTITIONS=4" in str(info.value)
