"""Reliability tier: no raw personal data leaves the raw topics.

After a simulated run (valid, duplicate and bad messages, plus hand-made ones that put e-mail
addresses, phone numbers and loyalty cards in every field that carries text), every raw e-mail
address (in any case), phone number and loyalty card number of the input is searched for, as
bytes, in: every topic of the scenario on the broker (outputs, internal topics, Faust changelogs)
except the raw inputs and the dead-letter keys and values (those are the original message by
contract), the dead-letter headers, the worker's log, /metrics and /v1/metrics.
"""

from __future__ import annotations

import asyncio
import re
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from service.broker import EmbeddedBroker
from service.simulate import Channel, SimMessage, generate
from tests.kafka.harness import Scenario, WorkerProcess, publish
from tests.reliability.exact import assert_exact

pytestmark = pytest.mark.reliability

# Starting only where a run of local-part characters starts (else quadratic on long runs).
_EMAIL = re.compile(
    r"(?<![A-Za-z0-9._%+\-])[A-Za-z0-9._%+\-]+@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)*\.[A-Za-z]{2,}"
)
# In free text only: elsewhere (help-desk timestamps) digits with separators are no phones.
_PHONE = re.compile(r"\+?\(?[0-9][0-9 ().\-]{5,}[0-9]")
_CARD = re.compile(r"LC[0-9]{10}")
_TEXT_FIELDS = ("comment", "text")
KINDS = ("email", "phone", "phone digits", "card", "card number")


def _hand_made(now: datetime) -> list[SimMessage]:
    """Messages that carry personal data in every field that could let it through."""
    at = now - timedelta(hours=1)
    iso = at.strftime("%Y-%m-%dT%H:%M:%S.000Z")
    desk = at.strftime("%Y-%m-%d %H:%M:%S.000000+00:00")
    ms, s = int(at.timestamp() * 1000), int(at.timestamp())
    chat = {
        "id": "pii-c1", "conversation_id": "pii-conv", "event": "message", "timestamp": ms,
        "customer": {"email": " Mixed.Case@Example.ORG ", "visitor_id": "v_pii"},
        "author": "customer",
        "text": "Mail me at Mixed.Case@Example.ORG or call +33 1 42 68 53 00, card LC4455667788",
    }  # fmt: skip
    ticket = {
        "event_id": "pii-s1", "ticket_id": "pii-t1", "action": "created", "occurred_at": desk,
        "requester": {"email": "\tTicket.Person@example.net"},
        "comment": "Reach me: ticket.person@example.net, (415) 555-2671 / 0044 20 7946 0000",
    }  # fmt: skip
    survey = {
        "event_id": "pii-w1", "type": "survey_response", "sent_at": iso,
        "anonymous_id": "pii-anon", "email": " Trim.Me@Example.com\t",
        "survey": {"kind": "nps", "score": 3, "comment": "ugh <jo.li@example.net> 555 867 5309"},
    }  # fmt: skip
    purchase = {
        "txn_id": "pii-p1", "store_id": "S001", "kind": "purchase", "time": s,
        "loyalty_card": "LC1212343456", "amount": "10.00", "currency": "EUR",
    }  # fmt: skip
    # Two known customers sharing an e-mail: a refused merge, which is logged.
    rating = {
        "id": "pii-c2", "conversation_id": "pii-conv2", "event": "rating", "timestamp": ms,
        "rating": 1, "customer": {"customer_id": "C900001", "email": "shared.person@example.net"},
    }  # fmt: skip
    sign_in = {
        "event_id": "pii-w2", "type": "sign_in", "sent_at": iso, "anonymous_id": "pii-a2",
        "user_id": "C900002", "email": "SHARED.PERSON@EXAMPLE.NET",
    }  # fmt: skip
    valid: list[tuple[Channel, dict[str, Any], str]] = [
        ("chat", chat, "pii-c1"), ("support", ticket, "pii-s1"), ("web", survey, "pii-w1"),
        ("store", purchase, "pii-p1"), ("chat", rating, "pii-c2"), ("web", sign_in, "pii-w2"),
    ]  # fmt: skip
    # Bad messages whose rejection detail could echo what they carry.
    bad: list[tuple[Channel, bytes, str]] = [
        ("chat", orjson.dumps({**chat, "id": None}), "schema_violation"),
        ("chat", orjson.dumps(chat)[:-40], "invalid_json"),
        ("web", orjson.dumps({**survey, "type": "signin"}), "schema_violation"),
        ("store", orjson.dumps({**purchase, "amount": None}), "schema_violation"),
        ("support", orjson.dumps({**ticket, "requester": {"email": 42}}), "schema_violation"),
        ("support", orjson.dumps({**ticket, "ticket_id": ""}), "schema_violation"),
    ]
    return [
        *(SimMessage(c, None, orjson.dumps(b), "valid", f"{c}:{i}") for c, b, i in valid),
        *(SimMessage(c, None, value, "bad", None, reason) for c, value, reason in bad),
    ]


def _texts(document: Any) -> list[str]:
    """Every free-text field of a raw event, at any depth."""
    found: list[str] = []
    if isinstance(document, dict):
        for name, value in document.items():
            if name in _TEXT_FIELDS and isinstance(value, str):
                found.append(value)
            else:
                found.extend(_texts(value))
    elif isinstance(document, list):
        for item in document:
            found.extend(_texts(item))
    return found


def personal_data(messages: list[SimMessage]) -> dict[str, set[bytes]]:
    """The raw e-mail addresses (lower-cased), phone numbers and loyalty card numbers the
    messages carry -> {kind: needles}. Phones are also searched as digits alone, and cards
    without their 'LC', for a leak that reformats them."""
    needles: dict[str, set[bytes]] = {kind: set() for kind in KINDS}
    for message in messages:
        text = message.value.decode("utf-8", "replace")
        needles["email"].update(e.lower().encode() for e in _EMAIL.findall(text))
        for card in _CARD.findall(text):
            needles["card"].add(card.encode())
            needles["card number"].add(card[2:].encode())
        try:
            document = orjson.loads(message.value)
        except orjson.JSONDecodeError:
            continue  # a cut-off message: its e-mails and cards are found above
        for free_text in _texts(document):
            for phone in _PHONE.findall(_EMAIL.sub(" ", free_text)):
                digits = re.sub(r"[^0-9]", "", phone)
                if len(digits) >= 7:
                    needles["phone"].add(phone.encode())
                    needles["phone digits"].add(digits.encode())
    return needles


def leaks(where: str, haystack: bytes, needles: dict[str, set[bytes]]) -> list[str]:
    """Every needle found in `haystack` -> '{where}: {kind} {needle}' (e-mails in any case)."""
    lowered = haystack.lower()
    return [
        f"{where}: {kind} {needle!r}"
        for kind, values in needles.items()
        for needle in sorted(values)
        if needle in (lowered if kind == "email" else haystack)
    ]


async def read_everything(
    bootstrap: str, prefix: str, idle: float = 3.0, within: float = 90.0
) -> dict[str, list[Any]]:
    """Every record of every topic whose name starts with `prefix` (contract and internal
    topics, changelogs of the group `{prefix}-cxpulse`), read until nothing new came for `idle`
    seconds: the test broker under-reports end offsets, so they cannot tell."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, fetch_max_wait_ms=100
    )
    await consumer.start()
    try:
        cluster = await consumer._client.fetch_all_metadata()
        topics = sorted(t for t in cluster.topics() if t.startswith(prefix))
        records: dict[str, list[Any]] = {topic: [] for topic in topics}
        assigned = [
            TopicPartition(topic, partition)
            for topic in topics
            for partition in sorted(cluster.partitions_for_topic(topic) or ())
        ]
        consumer.assign(assigned)
        await consumer.seek_to_beginning(*assigned)
        deadline = time.monotonic() + within
        last_new = time.monotonic()
        while time.monotonic() - last_new < idle and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=300, max_records=5000)
            for tp, batch in batches.items():
                records[tp.topic].extend(batch)
                last_new = time.monotonic()
    finally:
        await consumer.stop()
    return records


def test_no_personal_data_leaves_the_raw_topics(broker: EmbeddedBroker, tmp_path: Path) -> None:
    started = time.monotonic()
    scenario = Scenario.new(broker, tmp_path)
    now = datetime.now(UTC)
    messages = [
        *generate(500, customers=60, seed=10, now=now, span=timedelta(hours=12),
                  dup_share=0.03, bad_share=0.06),
        *_hand_made(now),
    ]  # fmt: skip
    needles = personal_data(messages)
    counts = {kind: len(values) for kind, values in needles.items()}
    assert min(counts.values()) >= 4, counts
    log_path = tmp_path / "w.log"
    worker = WorkerProcess(scenario, log_path, CX_EMIT_INTERVAL="500ms").start()
    try:
        worker.wait_ready()
        asyncio.run(publish(broker.bootstrap, scenario.prefix, messages))
        assert_exact(scenario, messages)
        surfaces = {path: worker.http(path)[1] for path in ("/metrics", "/v1/metrics")}
        samples = worker.metrics()
        assert samples["cxpulse_identity_merges_refused_total"] >= 1, "no refusal logged"
    finally:
        assert worker.stop() == 0, worker.log_tail()

    records = asyncio.run(read_everything(broker.bootstrap, scenario.prefix))
    raw = [t for t in records if t.startswith(scenario.topic("raw."))]
    scanned = {t: len(r) for t, r in records.items() if t not in raw}
    # The scan sees personal data where it is: the raw topics carry every needle but the
    # digit-only phones.
    in_raw = b"\n".join(r.value or b"" for t in raw for r in records[t])
    typed = {k: v for k, v in needles.items() if k != "phone digits"}
    assert len(leaks("raw", in_raw, typed)) == sum(len(v) for v in typed.values())

    def scanned_parts(topic: str, record: Any) -> list[tuple[str, bytes]]:
        headers = b"\n".join(
            name.encode() + b"=" + (value or b"") for name, value in record.headers
        )
        if topic == scenario.topic("deadletter"):  # original key and bytes, by contract
            return [("headers", headers)]
        return [("headers", headers), ("key", record.key or b""), ("value", record.value or b"")]

    found: list[str] = []
    for topic, topic_records in records.items():
        if topic in raw:
            continue
        # One search per needle over the whole topic; record by record only where one hits.
        whole = b"\n".join(part for r in topic_records for _, part in scanned_parts(topic, r))
        if not leaks(topic, whole, needles):
            continue
        for record in topic_records:
            at = f"{topic}[{record.partition}]@{record.offset}"
            for name, part in scanned_parts(topic, record):
                found += leaks(f"{at} {name}", part, needles)
    for path, body in surfaces.items():
        found += leaks(path, body, needles)
    found += leaks("worker log", log_path.read_bytes(), needles)
    print(
        f"\nprivacy scan: {counts} needles, {sum(scanned.values())} records on "
        f"{len(scanned)} topics, {log_path.stat().st_size} log bytes; "
        f"{time.monotonic() - started:.1f}s"
    )
    assert not found, "\n".join(found[:20])
    assert scanned[scenario.topic("timeline")] >= len({m.event_id for m in messages} - {None})
    assert any(t.endswith("-changelog") for t in scanned), sorted(scanned)
