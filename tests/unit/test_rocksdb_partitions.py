"""The RocksDB store puts a write in the database of the partition its table writes the key's changelog to."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import orjson

from tables.rocksdb_store import Store


class FakeTable:
    """A ``use_partitioner`` table: ``chooses`` maps decoded keys to the partition the table picks itself."""

    use_partitioner = True

    def __init__(self, chooses: dict[str, int]) -> None:
        self.chooses = chooses
        self.changelog_topic = SimpleNamespace(get_topic_name=lambda: "ns-quota-changelog")

    def partition_for_key(self, key: Any) -> int | None:
        return self.chooses.get(key)


def store(table: FakeTable, hashed: dict[bytes, int]) -> Any:
    producer = SimpleNamespace(key_partition=lambda topic, key: SimpleNamespace(partition=hashed[key]))
    return SimpleNamespace(
        table=table, app=SimpleNamespace(producer=producer), _decode_key=lambda raw: orjson.loads(raw)
    )


def test_a_key_is_put_where_its_table_writes_its_changelog() -> None:
    # The serialized key is JSON ('"req_1/alice"'): the table, not the raw bytes, knows its partition.
    table = FakeTable({"req_1/alice": 3})
    fake = store(table, {b'"u"': 1})
    assert Store._partition_of(fake, orjson.dumps("req_1/alice")) == 3
    # A table that leaves it to the partitioner: the producer's hash of the serialized key.
    assert Store._partition_of(fake, orjson.dumps("u")) == 1
