"""Reliability tier, scenario 6: poison input mixed into a stream of valid traffic.

About 2 % of a 1500-message stream, on all four raw topics, is hostile: invalid UTF-8, JSON
nested 10 000 deep, a 10 MB record, NaN/Infinity, integers beyond 2^64, wrong types, null keys,
far-future and pre-1970 timestamps, another channel's payload. Each must reach cx.deadletter
with its reason and its original key and bytes, the worker must not crash, and the valid events'
metrics must stay exact. A few near-poison valid messages (exactly 64 KiB, 1000 levels deep,
a huge integer in an unknown field) must be accepted.
"""

from __future__ import annotations

import asyncio
import copy
import random
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaProducer

from service.broker import EmbeddedBroker
from service.canonical import Source
from service.parse import Limits, Rejected
from service.simulate import Channel, SimMessage, generate, topic_for
from service.worker import ingest_one
from tests.kafka.harness import Scenario, WorkerProcess, total
from tests.reliability.exact import assert_exact

pytestmark = pytest.mark.reliability

DEFAULT_LIMITS = Limits(max_payload_bytes=64 * 1024, max_clock_skew=timedelta(minutes=5))
HUGE = 10 * 1024 * 1024  # the 10 MB record
PRODUCER_MAX_REQUEST = 16 * 1024 * 1024  # aiokafka's default (1 MiB) refuses the 10 MB record
BEYOND_64_BITS = 2**64 + 1
_BAD = "\U0010fffe-invalid-utf8-here"  # a marker replaced by raw invalid bytes after encoding


def _rfc3339(at: datetime) -> str:
    return at.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def template(channel: Channel, source_id: str, at: datetime) -> dict[str, Any]:
    """A valid event of `channel` with every optional field present (contract 2.1)."""
    templates: dict[Channel, dict[str, Any]] = {
        "web": {
            "event_id": source_id,
            "type": "survey_response",
            "sent_at": _rfc3339(at),
            "anonymous_id": f"anon-{source_id}",
            "user_id": f"U-{source_id}",
            "email": f"{source_id}@example.com",
            "session_id": f"sess-{source_id}",
            "page": {"url": "https://shop.example.com/", "title": "Home"},
            "survey": {"kind": "nps", "score": 9, "comment": "Great"},
        },
        "chat": {
            "id": source_id,
            "conversation_id": f"conv-{source_id}",
            "event": "rating",
            "timestamp": int(at.timestamp() * 1000),
            "customer": {
                "customer_id": f"U-{source_id}",
                "email": f"{source_id}@example.com",
                "visitor_id": f"v-{source_id}",
            },
            "author": "customer",
            "text": "thanks",
            "rating": 5,
        },
        "support": {
            "event_id": source_id,
            "ticket_id": f"T-{source_id}",
            "action": "survey",
            "occurred_at": at.astimezone(UTC).isoformat(sep=" ", timespec="microseconds"),
            "requester": {"email": f"{source_id}@example.com", "customer_id": f"U-{source_id}"},
            "comment": "solved, thanks",
            "survey": {"csat": 4, "ces": 6},
        },
        "store": {
            "txn_id": source_id,
            "store_id": "S001",
            "kind": "purchase",
            "time": int(at.timestamp()),
            "loyalty_card": f"LC-{source_id}",
            "customer_id": f"U-{source_id}",
            "amount": "19.99",
            "currency": "EUR",
            "nps": 10,
            "csat": 5,
        },
    }
    return templates[channel]


def _wrong_values(value: Any) -> list[Any]:
    """JSON values of a type other than `value`'s: no coercion may rescue any of them."""
    if isinstance(value, bool):
        return [1, "true", [True]]
    if isinstance(value, int):
        return [str(value), value + 0.5, True, [value], {"value": value}]
    if isinstance(value, str):
        return [5, 1.5, False, [value], {"value": value}]
    if isinstance(value, dict):
        return ["{}", 5, [value], True]
    raise AssertionError(f"no wrong values for {value!r}")


def wrong_types(now: datetime) -> Iterator[tuple[Channel, bytes, str]]:
    """Every field of every channel (nested ones too) given every wrong JSON type ->
    (channel, bytes, where)."""
    at = now - timedelta(hours=1)
    channels: tuple[Channel, ...] = ("web", "chat", "support", "store")
    for channel in channels:
        base = template(channel, f"wt-{channel}", at)
        for name, value in base.items():
            paths: list[tuple[str, ...]] = [(name,)]
            if isinstance(value, dict):
                paths += [(name, inner) for inner in value]
            for path in paths:
                holder = base
                for part in path[:-1]:
                    holder = holder[part]
                for wrong in _wrong_values(holder[path[-1]]):
                    document = copy.deepcopy(base)
                    target = document
                    for part in path[:-1]:
                        target = target[part]
                    target[path[-1]] = wrong
                    yield channel, orjson.dumps(document), f"{'.'.join(path)}={wrong!r}"


def _deep(levels: int) -> bytes:
    """JSON objects nested `levels` deep."""
    return b'{"a":' * levels + b"1" + b"}" * levels


def _with_raw(document: dict[str, Any], name: str, raw: bytes) -> bytes:
    """`document` as JSON with `raw` (any bytes) as the value of its field `name`."""
    encoded = orjson.dumps({**document, name: _BAD})
    return encoded.replace(orjson.dumps(_BAD), raw)


def curated(now: datetime) -> Iterator[tuple[Channel, bytes, str]]:
    """One or more of every poison class -> (channel, bytes, expected reason)."""
    at = now - timedelta(hours=2)
    web, chat = template("web", "p-web", at), template("chat", "p-chat", at)
    support, store = template("support", "p-sup", at), template("store", "p-store", at)
    # invalid_json: not UTF-8, unparseable numbers, too deep, not JSON at all
    yield "web", _with_raw(web, "anonymous_id", b'"\xff\xfe\xc3\x28"'), "invalid_json"
    yield "chat", b"\xc3\x28\xa0\xa1 not utf-8 \x80", "invalid_json"
    yield "support", _with_raw(support, "comment", b'"lone \\ud800 surrogate"'), "invalid_json"
    yield "store", b"[" * 10_000 + b"]" * 10_000, "invalid_json"
    yield "web", _with_raw(web, "x_deep", _deep(10_000)), "invalid_json"  # in an unknown field
    yield "chat", _with_raw(chat, "rating", b"NaN"), "invalid_json"
    yield "store", _with_raw(store, "nps", b"Infinity"), "invalid_json"
    yield "support", _with_raw(support, "survey", b'{"csat": -Infinity}'), "invalid_json"
    yield "web", _with_raw(web, "survey", b'{"kind": "nps", "score": 1e400}'), "invalid_json"
    yield "store", b"", "invalid_json"
    yield "chat", b"\xef\xbb\xbf" + orjson.dumps(chat), "invalid_json"  # a byte-order mark
    yield "web", orjson.dumps(web)[:-7], "invalid_json"  # truncated
    # not_an_object
    yield "chat", b"null", "not_an_object"
    yield "web", orjson.dumps([web]), "not_an_object"
    yield "support", b'"a string"', "not_an_object"
    yield "store", b"42", "not_an_object"
    # integers beyond 2^64 where a small integer belongs
    yield (
        "web",
        _with_raw(web, "survey", b'{"kind":"nps","score":%d}' % BEYOND_64_BITS),
        ("schema_violation"),
    )
    yield "chat", _with_raw(chat, "rating", b"-%d" % BEYOND_64_BITS), "schema_violation"
    yield "store", _with_raw(store, "nps", b"%d" % (10**30)), "schema_violation"
    # pre-1970 timestamps, in each channel's own format
    yield "web", orjson.dumps({**web, "sent_at": "1969-12-31T23:59:59.999Z"}), "schema_violation"
    yield "chat", orjson.dumps({**chat, "timestamp": -1}), "schema_violation"
    yield (
        "support",
        orjson.dumps({**support, "occurred_at": "1900-01-01 00:00:00+00:00"}),
        ("schema_violation"),
    )
    yield "store", orjson.dumps({**store, "time": -86_400}), "schema_violation"
    # another channel's (valid) payload on the wrong topic
    yield "web", orjson.dumps(template("store", "x-store", at)), "schema_violation"
    yield "store", orjson.dumps(template("web", "x-web", at)), "schema_violation"
    yield "support", orjson.dumps(template("chat", "x-chat", at)), "schema_violation"
    yield "chat", orjson.dumps(template("support", "x-sup", at)), "schema_violation"
    # far-future timestamps, one of them beyond 64 bits
    yield (
        "web",
        orjson.dumps({**web, "sent_at": "9999-12-31T23:59:59.999Z"}),
        ("timestamp_in_future"),
    )
    yield "chat", _with_raw(chat, "timestamp", b"%d" % BEYOND_64_BITS), "timestamp_in_future"
    yield (
        "support",
        orjson.dumps({**support, "occurred_at": "2999-01-01 00:00:00+00:00"}),
        ("timestamp_in_future"),
    )
    yield (
        "store",
        orjson.dumps({**store, "time": int((now + timedelta(hours=1)).timestamp())}),
        ("timestamp_in_future"),
    )
    # too large: 1 byte over the limit, and 10 MB
    over = orjson.dumps({**chat, "pad": ""})
    yield (
        "chat",
        orjson.dumps({**chat, "pad": "x" * (64 * 1024 + 1 - len(over))}),
        ("payload_too_large"),
    )
    yield "store", orjson.dumps({**store, "pad": "x" * HUGE}), "payload_too_large"


def near_poison(now: datetime) -> Iterator[tuple[Channel, bytes, str]]:
    """Valid messages at the edges of the limits -> (channel, bytes, event id)."""
    at = now - timedelta(hours=3)
    at_limit = template("support", "edge-64k", at)
    size = len(orjson.dumps({**at_limit, "pad": ""}))
    yield "support", orjson.dumps({**at_limit, "pad": "x" * (64 * 1024 - size)}), "support:edge-64k"
    deep = template("web", "edge-deep", at)
    yield "web", _with_raw(deep, "x_deep", _deep(1000)), "web:edge-deep"
    big = template("store", "edge-bigint", at)
    yield "store", _with_raw(big, "x_counter", b"%d" % BEYOND_64_BITS), "store:edge-bigint"


def poison_messages(now: datetime, rng: random.Random, sweep_sample: int) -> list[SimMessage]:
    """The curated poison, a sample of the wrong-type sweep and the near-poison valid
    messages, with keys (every third one null) and unique (key, value) pairs."""
    sweep = [(c, v, "schema_violation") for c, v, _ in wrong_types(now)]
    bad = [*curated(now), *rng.sample(sweep, sweep_sample)]
    messages: list[SimMessage] = []
    for number, (channel, value, reason) in enumerate(bad):
        key = None if number % 3 == 0 else f"poison-{number}".encode()
        messages.append(SimMessage(channel, key, value, "bad", None, reason))
    for channel, value, event_id in near_poison(now):
        messages.append(SimMessage(channel, b"edge-" + event_id.encode(), value, "valid", event_id))
    assert len({(m.key, m.value) for m in messages}) == len(messages)
    return messages


def outcome(message: SimMessage, now: datetime) -> str:
    """What the worker's ingest stage makes of one message: a reason or 'valid'."""
    topic = topic_for("cx", message.channel)
    result = ingest_one(
        message.channel, message.value, Source(topic=topic, partition=0, offset=0),
        DEFAULT_LIMITS, b"poison-test-pii-key", now,
    )  # fmt: skip
    return result.reason if isinstance(result, Rejected) else "valid"


def test_every_poison_earns_its_reason() -> None:
    """No broker: the whole wrong-type sweep and the curated poison, classified as expected
    by the worker's own ingest function (so the stream test's accounting is sound)."""
    now = datetime.now(UTC)
    sweep = list(wrong_types(now))
    assert len(sweep) > 200
    wrong = {where: outcome(SimMessage(c, None, v, "bad", None), now) for c, v, where in sweep}
    assert {k: v for k, v in wrong.items() if v != "schema_violation"} == {}
    for message in poison_messages(now, random.Random(6), sweep_sample=0):
        expected = message.reason or "valid"
        assert outcome(message, now) == expected, (message.channel, message.value[:200])


async def publish_all(bootstrap: str, prefix: str, messages: Iterable[SimMessage]) -> None:
    """`harness.publish` with a producer that accepts the 10 MB record."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", linger_ms=5, max_request_size=PRODUCER_MAX_REQUEST
    )
    await producer.start()
    try:
        futures = [
            await producer.send(topic_for(prefix, m.channel), m.value, key=m.key) for m in messages
        ]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


def wait_consumed(worker: WorkerProcess, count: int, within: float) -> None:
    """Poll /metrics until the worker has read `count` raw messages; fail at once if it died."""
    deadline = time.monotonic() + within
    consumed = 0.0
    while time.monotonic() < deadline:
        assert worker.process is not None
        assert worker.process.poll() is None, f"the worker died\n{worker.log_tail()}"
        consumed = total(worker.metrics(), "cxpulse_messages_consumed_total")
        if consumed >= count:
            return
        time.sleep(0.5)
    raise AssertionError(f"{consumed} of {count} messages read after {within} s")


def test_poison_in_stream_is_dead_lettered_and_valid_metrics_stay_exact(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    scenario = Scenario.new(broker, tmp_path)
    now = datetime.now(UTC)
    rng = random.Random(66)
    messages = list(
        generate(1500, customers=120, seed=66, now=now, span=timedelta(hours=12),
                 dup_share=0.02, bad_share=0.0)
    )  # fmt: skip
    extra = poison_messages(now, rng, sweep_sample=6)
    for message in extra:  # at random positions
        messages.insert(rng.randrange(len(messages) + 1), message)
    bad = [m for m in messages if m.kind == "bad"]
    print(f"\n{len(messages)} messages, {len(bad)} poison ({len(bad) / len(messages):.1%})")

    worker = WorkerProcess(scenario, tmp_path / "w.log", CX_EMIT_INTERVAL="500ms").start()
    try:
        worker.wait_ready()
        started = time.monotonic()
        asyncio.run(publish_all(broker.bootstrap, scenario.prefix, messages))
        wait_consumed(worker, len(messages), within=120.0)
        assert_exact(scenario, messages)
        print(f"poison run: all accounted for in {time.monotonic() - started:.1f} s")

        assert worker.process is not None
        assert worker.process.poll() is None, worker.log_tail()
        samples = worker.metrics()
        reasons = Counter(m.reason for m in bad)
        for reason, count in reasons.items():
            dead = sum(
                v for k, v in samples.items()
                if k.startswith("cxpulse_deadletters_total{") and f'reason="{reason}"' in k
            )  # fmt: skip
            assert dead == count, (reason, dead, count)
        consumed = total(samples, "cxpulse_messages_consumed_total")
        assert consumed == len(messages)
        assert consumed == (
            total(samples, "cxpulse_events_accepted_total")
            + total(samples, "cxpulse_events_duplicate_total")
            + total(samples, "cxpulse_deadletters_total")
        )
    finally:
        assert worker.stop() == 0, worker.log_tail()
