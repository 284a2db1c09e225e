"""Agent tier (Faust, no broker): the worker's partition assignor gives the two
single-partition stages (identity, metrics merger) to different members, keeps each stage's
input topic with its table's changelog, and assigns everything else as Faust does."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from aiokafka.coordinator.protocol import ConsumerProtocolMemberMetadata
from faust.assignor.client_assignment import ClientAssignment, ClientMetadata
from faust.assignor.partition_assignor import PartitionAssignor

from service.assignor import (
    FAUST_PERFORM_SHA256,
    SpreadAssignor,
    faust_perform_digest,
    split_families,
)
from service.worker import Worker, build_worker
from tests.agent._settings import offline_settings

pytestmark = pytest.mark.agent

PARTITIONS = 8


def test_the_copy_is_of_the_faust_installed() -> None:
    """`SpreadAssignor._perform_assignment` copies Faust's: a Faust that changed it must be
    read again before the digest is updated."""
    assert faust_perform_digest() == FAUST_PERFORM_SHA256


def test_families_are_taken_out_of_their_group() -> None:
    families = [frozenset({"id", "id-log"}), frozenset({"part", "part-log"})]
    found, rest = split_families([{"id", "id-log", "part", "part-log", "leader"}], families)
    assert found == [{"id", "id-log"}, {"part", "part-log"}]
    assert rest == [{"leader"}]
    # a family split across sets (members subscribed differently) stays as Faust had it
    found, rest = split_families([{"id", "part", "part-log"}, {"id-log"}], families)
    assert found == [{"part", "part-log"}]
    assert rest == [{"id"}, {"id-log"}]


@pytest.fixture
def worker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Worker:
    worker = build_worker(offline_settings(tmp_path, monkeypatch, partitions=PARTITIONS))
    worker.app.finalize()
    return worker


class _Cluster:
    def __init__(self, partitions: dict[str, int]) -> None:
        self.partitions = partitions

    def partitions_for_topic(self, topic: str) -> set[int]:
        return set(range(self.partitions[topic]))


def _topics(worker: Worker) -> dict[str, int]:
    """Every topic the worker's members subscribe to -> its number of partitions."""
    raw = dict.fromkeys(worker.topics.raw_topics, 4)
    internal = {
        worker.topics.accepted: PARTITIONS,
        worker.topics.customer_stream: PARTITIONS,
        worker.topics.metrics_stream: PARTITIONS,
        worker.topics.identity_stream: 1,
        worker.topics.partials_stream: 1,
        f"{worker.app.conf.id}-__assignor-__leader": 1,
    }
    changelogs = {
        table.changelog_topic.get_topic_name(): table.partitions
        for table in worker.app.tables.values()
    }
    return {**raw, **internal, **changelogs}


def _assign(
    worker: Worker, assignor: PartitionAssignor, held: dict[str, dict[str, list[int]]]
) -> dict[str, set[tuple[str, int]]]:
    """Members (name -> the active partitions each held before) -> what each is assigned."""
    topics = _topics(worker)
    members = {
        name: ConsumerProtocolMemberMetadata(
            assignor.version,
            sorted(topics),
            ClientMetadata(
                assignment=ClientAssignment(actives=actives, standbys={}),
                url=f"http://{name}:6066",
                changelog_distribution={},
            ).dumps(),
        )
        for name, actives in held.items()
    }
    result: Any = assignor._perform_assignment(_Cluster(topics), members)
    assigned = {
        name: {(topic, p) for topic, partitions in given.assignment for p in partitions}
        for name, given in result.items()
    }
    # every partition of every topic to exactly one member
    counts = Counter(tp for tps in assigned.values() for tp in tps)
    assert counts == Counter((t, p) for t, n in topics.items() for p in range(n))
    return assigned


def _holder(assigned: dict[str, set[tuple[str, int]]], topic: str) -> str:
    [name] = [name for name, tps in assigned.items() if (topic, 0) in tps]
    return name


def _families(worker: Worker) -> list[tuple[str, str]]:
    return [
        (worker.topics.identity_stream, worker.identity_table.changelog_topic.get_topic_name()),
        (worker.topics.partials_stream, worker.partials_table.changelog_topic.get_topic_name()),
    ]


def test_the_worker_assigns_with_the_spreading_assignor(worker: Worker) -> None:
    assert isinstance(worker.app.assignor, SpreadAssignor)


def test_faust_puts_both_single_partition_stages_on_one_member(worker: Worker) -> None:
    """What the spreading changes: Faust's own assignor."""
    assigned = _assign(worker, PartitionAssignor(worker.app), {"a": {}, "b": {}})
    (identity, _), (partials, _) = _families(worker)
    assert _holder(assigned, identity) == _holder(assigned, partials)


@pytest.mark.parametrize("members", [2, 3])
def test_the_single_partition_stages_go_to_different_members(worker: Worker, members: int) -> None:
    names = [f"m{n}" for n in range(members)]
    assigned = _assign(worker, worker.app.assignor, {name: {} for name in names})
    holders = []
    for stream, changelog in _families(worker):
        holders.append(_holder(assigned, stream))
        assert _holder(assigned, changelog) == holders[-1]  # a stage with its table
    assert len(set(holders)) == 2
    # the partitioned stages still spread evenly, each partition with its changelogs
    for name, tps in assigned.items():
        mine = {p for topic, p in tps if topic == worker.topics.customer_stream}
        assert len(mine) in (PARTITIONS // members, -(-PARTITIONS // members))
        changelog = worker.customers_table.changelog_topic.get_topic_name()
        assert {p for topic, p in tps if topic == changelog} == mine, name


def test_a_member_holding_both_gives_one_up_and_keeps_the_other(worker: Worker) -> None:
    """Sticky as Faust is: a member that held both (it was alone) keeps one of them."""
    one = _assign(worker, worker.app.assignor, {"a": {}})
    previous = {"a": {topic: sorted(p for t, p in one["a"] if t == topic) for topic, _ in one["a"]}}
    assigned = _assign(worker, worker.app.assignor, {**previous, "b": {}})
    (identity, _), (partials, _) = _families(worker)
    assert {_holder(assigned, identity), _holder(assigned, partials)} == {"a", "b"}
    assert _holder(assigned, identity) == "a"  # the first family kept where it was


def test_a_single_member_gets_everything(worker: Worker) -> None:
    assigned = _assign(worker, worker.app.assignor, {"solo": {}})
    assert len(assigned["solo"]) == sum(_topics(worker).values())
