"""Unit tier: `service.kafka.CachedPartitioner` places every key as Kafka's default does, with
a murmur2 equal to aiokafka's."""

from __future__ import annotations

from aiokafka import partitioner as aiokafka_partitioner
from aiokafka.partitioner import DefaultPartitioner
from hypothesis import given
from hypothesis import strategies as st

from service.kafka import CachedPartitioner, murmur2


@given(key=st.binary(max_size=300))
def test_murmur2_equals_aiokafkas(key: bytes) -> None:
    assert murmur2(key) == aiokafka_partitioner.murmur2(key)


@given(
    keys=st.lists(st.binary(max_size=64), min_size=1, max_size=50),
    partitions=st.integers(min_value=1, max_value=64),
)
def test_same_partition_as_the_default_partitioner(keys: list[bytes], partitions: int) -> None:
    cached, default = CachedPartitioner(size=8), DefaultPartitioner()
    every = list(range(partitions))
    for key in keys + keys[::-1]:  # the second pass hits the cache
        assert cached(key, every, every) == default(key, every, every)


# Kafka's own murmur2 test vectors (the Java client's UtilsTest), as signed 32-bit ints.
JAVA_MURMUR2 = {
    b"21": -973932308,
    b"foobar": -790332482,
    b"a-little-bit-long-string": -985981536,
    b"a-little-bit-longer-string": -1486304829,
    b"abc": 479470107,
}


def test_placement_of_the_java_client() -> None:
    """Java: toPositive(murmur2(key)) % partitions."""
    for key, hashed in JAVA_MURMUR2.items():
        assert murmur2(key) == hashed & 0xFFFFFFFF
    for partitions in (1, 3, 8, 12):
        every = list(range(partitions))
        for key, hashed in JAVA_MURMUR2.items():
            assert CachedPartitioner()(key, every, every) == (hashed & 0x7FFFFFFF) % partitions


def test_no_key_goes_to_an_available_partition() -> None:
    assert CachedPartitioner()(None, list(range(8)), [3]) == 3
