"""Unit tier: `service.pausing` forwards Faust's pauses and resumes of changelog partitions to
the Kafka client, on the client's thread and in order, and leaves other partitions to Faust."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka import TopicPartition
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP

from service import pausing

pytestmark = pytest.mark.unit

CHANGELOG = "app-customers-changelog"


class Client:
    """An aiokafka consumer as `apply` uses it: what is assigned, what was paused/resumed."""

    def __init__(self, *assigned: TopicPartition) -> None:
        self.assigned = set(assigned)
        self.calls: list[tuple[str, tuple[TopicPartition, ...]]] = []

    def assignment(self) -> set[TopicPartition]:
        return self.assigned

    def pause(self, *tps: TopicPartition) -> None:
        assert all(type(tp) is TopicPartition for tp in tps)  # aiokafka refuses anything else
        self.calls.append(("pause", tps))

    def resume(self, *tps: TopicPartition) -> None:
        assert all(type(tp) is TopicPartition for tp in tps)
        self.calls.append(("resume", tps))


class ThreadLoop:
    """The client thread's loop: callbacks queued, run when the test says."""

    def __init__(self) -> None:
        self.queued: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []

    def call_soon_threadsafe(self, callback: Callable[..., Any], *args: Any) -> None:
        self.queued.append((callback, args))

    def run(self) -> None:
        queued, self.queued = self.queued, []
        for callback, args in queued:
            callback(*args)


class FaustConsumer:
    """Faust's aiokafka consumer as its own `pause_partitions` and `forward` use it."""

    def __init__(self, client: Client | None) -> None:
        self.app = SimpleNamespace(tables=SimpleNamespace(changelog_topics={CHANGELOG}))
        self._thread = SimpleNamespace(_consumer=client, thread_loop=ThreadLoop())
        self._active_partitions: set[TP] = set()
        self._paused_partitions: set[TP] = set()

    def _get_active_partitions(self) -> set[TP]:
        return self._active_partitions


def test_apply_pauses_and_resumes_only_what_the_client_has_assigned() -> None:
    client = Client(TopicPartition(CHANGELOG, 0), TopicPartition(CHANGELOG, 1))
    done = pausing.apply(client, [TP(CHANGELOG, 1), TP(CHANGELOG, 7)], "pause")
    assert done == [TopicPartition(CHANGELOG, 1)]
    assert pausing.apply(client, [TP(CHANGELOG, 9)], "resume") == []
    assert client.calls == [("pause", (TopicPartition(CHANGELOG, 1),))]


def test_only_changelog_partitions_are_forwarded_on_the_clients_thread_in_order() -> None:
    client = Client(TopicPartition(CHANGELOG, 0), TopicPartition("app.raw.web", 0))
    consumer = FaustConsumer(client)
    pausing.forward(consumer, [TP(CHANGELOG, 0), TP("app.raw.web", 0)], "pause")
    pausing.forward(consumer, [TP("app.raw.web", 0)], "resume")  # not a changelog: nothing
    pausing.forward(consumer, [TP(CHANGELOG, 0)], "resume")
    assert client.calls == []  # not from this thread
    consumer._thread.thread_loop.run()
    assert client.calls == [
        ("pause", (TopicPartition(CHANGELOG, 0),)),
        ("resume", (TopicPartition(CHANGELOG, 0),)),
    ]


def test_nothing_is_forwarded_before_the_client_exists() -> None:
    consumer = FaustConsumer(None)
    pausing.forward(consumer, [TP(CHANGELOG, 0)], "pause")
    assert consumer._thread.thread_loop.queued == []


def test_installed_faust_keeps_its_own_bookkeeping_and_forwards() -> None:
    pausing.install()
    pausing.install()  # once per process
    client = Client(TopicPartition(CHANGELOG, 0))
    consumer = FaustConsumer(client)
    consumer._active_partitions = {TP(CHANGELOG, 0), TP("app.raw.web", 0)}
    faust_consumer: Any = faust_aiokafka.Consumer
    # a one-pass iterable, as Faust may pass: both Faust and the client see every partition
    faust_consumer.pause_partitions(consumer, iter([TP(CHANGELOG, 0), TP("app.raw.web", 0)]))
    assert consumer._paused_partitions == {TP(CHANGELOG, 0), TP("app.raw.web", 0)}
    assert consumer._active_partitions == set()
    faust_consumer.resume_partitions(consumer, iter([TP(CHANGELOG, 0)]))
    assert consumer._paused_partitions == {TP("app.raw.web", 0)}
    consumer._thread.thread_loop.run()
    assert client.calls == [
        ("pause", (TopicPartition(CHANGELOG, 0),)),
        ("resume", (TopicPartition(CHANGELOG, 0),)),
    ]
