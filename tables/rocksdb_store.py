"""RocksDB store for tables written outside a stream (``use_partitioner=True``).

faust-streaming 0.15.3's RocksDB store picks the per-partition database of a
write from the *current event* (``assert event is not None`` in ``_set``), so a
write from a web view (admission) fails. Our tables are keyed like their
changelog, so the partition of a write is the partitioner's choice for the
key, which is what this store uses when there is no event or the table
partitions by key. ``INFERSTREAM_TABLE_STORE=rocksdb://`` selects it.
"""

from __future__ import annotations

from typing import Any

from faust.stores import STORES
from faust.stores.rocksdb import Store as FaustRocksDBStore
from faust.streams import current_event


class Store(FaustRocksDBStore):
    def _set(self, key: bytes, value: bytes | None) -> None:
        event = current_event()
        if event is None or self.table.use_partitioner:
            partition = self._partition_of(key)
        else:
            partition = event.message.partition
        db = self._db_for_partition(partition)
        self._key_index[key] = partition
        db.put(key, value)

    def _partition_of(self, key: bytes) -> int:
        # A table may choose the partition of its keys itself (tables.reservations: by the user part).
        chosen = self.table.partition_for_key(self._decode_key(key)) if self.table.use_partitioner else None
        if chosen is not None:
            return int(chosen)
        topic = self.table.changelog_topic.get_topic_name()
        tp: Any = self.app.producer.key_partition(topic, key)
        return int(tp.partition)


def install() -> None:
    """Make ``rocksdb://`` mean this store."""
    STORES.aliases["rocksdb"] = f"{__name__}:Store"
