"""Synthetic traffic: (count, seed, now) -> realistic raw messages for the four input channels.

People follow journeys across channels (browse anonymously, sign in, chat, open a ticket, buy in
a store) with overlapping identifiers, so identity resolution has real work to do. A small share
of messages are exact re-sends or deliberately bad, one of each dead-letter class in turn.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Literal

import orjson

if TYPE_CHECKING:
    from service.settings import Settings

Channel = Literal["web", "chat", "support", "store"]
Kind = Literal["valid", "duplicate", "bad"]
Payload = dict[str, Any]

CHANNELS: tuple[Channel, ...] = ("web", "chat", "support", "store")
SOURCE_ID_FIELD: dict[Channel, str] = {
    "web": "event_id",
    "chat": "id",
    "support": "event_id",
    "store": "txn_id",
}
# The order bad messages cycle through, each named by the dead-letter reason it should earn.
BAD_CLASSES: tuple[str, ...] = (
    "invalid_json",
    "not_an_object",
    "missing_field",
    "score_out_of_range",
    "timestamp_in_future",
    "payload_too_large",
)
BAD_REASONS: dict[str, str] = {
    "invalid_json": "invalid_json",
    "not_an_object": "not_an_object",
    "missing_field": "schema_violation",
    "score_out_of_range": "schema_violation",
    "timestamp_in_future": "timestamp_in_future",
    "payload_too_large": "payload_too_large",
}
OVERSIZED_BYTES = 80 * 1024  # comfortably above the 64 KiB default limit

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_CENT = Decimal("0.01")
_ACTIVE_THREADS = 24  # conversations/sessions/tickets interleaved at any moment
_RESEND_WINDOW = timedelta(hours=12)  # re-sends stay well inside the 24 h dedup horizon
_RESEND_CANDIDATES = 10_000  # bounds memory on long runs
_NO_KEY_SHARE = 0.10
_EXTRA_FIELD_SHARE = 0.03
_PII_TEXT_SHARE = 0.08

_FIRST = (
    "ana", "luis", "maria", "john", "emma", "noah", "olivia", "liam", "sofia", "lucas",
    "mia", "leon", "chloe", "david", "sara", "tom", "nina", "omar", "yuki", "ines",
    "paul", "lea", "hugo", "zoe", "raj", "elena", "marco", "julia", "felix", "amara",
)  # fmt: skip
_LAST = (
    "perez", "smith", "garcia", "muller", "rossi", "dubois", "kowalski", "tanaka", "silva",
    "jones", "brown", "novak", "berg", "khan", "costa", "wagner", "moreau", "larsen", "kim",
    "lopez", "fischer", "martin", "nguyen", "ali", "schmidt", "ricci", "petit", "sato",
)  # fmt: skip
_DOMAINS = ("example.com", "mail.example.org", "example.net", "inbox.example.com")
_BROWSER_OFFSETS = (0, 0, 0, 60, 120, -300, -480, 330, 540)  # minutes
_DESK_OFFSETS = (0, 60, 120, -300)
_PAGES = (
    ("https://shop.example.com/", "Home"),
    ("https://shop.example.com/c/shoes", "Shoes"),
    ("https://shop.example.com/c/jackets", "Jackets"),
    ("https://shop.example.com/p/trail-runner-2", "Trail Runner 2"),
    ("https://shop.example.com/p/rain-shell", "Rain Shell"),
    ("https://shop.example.com/cart", "Your cart"),
    ("https://shop.example.com/checkout", "Checkout"),
    ("https://shop.example.com/help/returns", "Returns & refunds"),
    ("https://shop.example.com/help/shipping", None),
    ("https://shop.example.com/account/orders", "My orders"),
)
_POSITIVE = (
    "Great service, thanks a lot!",
    "Super fast delivery and the jacket fits perfectly.",
    "The agent was really helpful and friendly.",
    "Easy checkout, love the new app.",
    "Problem solved in minutes, excellent support.",
    "Very happy with my purchase.",
)
_NEGATIVE = (
    "Terrible experience, my order is two weeks late.",
    "Nobody answers, this is frustrating and useless.",
    "The product broke after one day, very disappointed.",
    "I was charged twice and still no refund. Awful.",
    "Checkout keeps failing, worst website ever.",
    "Rude staff and a long queue at the till.",
)
_NEUTRAL = (
    "Where is my order?",
    "Can I change the delivery address?",
    "Do you have this in size 42?",
    "How do I return an item?",
    "I need an invoice for my last purchase.",
    "Is the store open on Sunday?",
)
_AGENT_LINES = (
    "Thanks for reaching out, let me check that for you.",
    "I have escalated this to our logistics team.",
    "Your refund has been issued, it takes 3-5 business days.",
    "Could you send me your order number please?",
    "Sorry for the trouble, I have sent a replacement.",
)
_BOT_LINES = (
    "Hi! I am the virtual assistant. How can I help?",
    "You can track your order under My orders.",
    "Let me connect you with a human agent.",
    "Here is our returns policy: https://shop.example.com/help/returns",
)
_PHONES = ("+1 415-555-0132", "+44 20 7946 0958", "+49 30 1234567", "(212) 555-0187")
_EXTRA_FIELDS: tuple[tuple[str, Any], ...] = (
    ("sdk_version", "4.12.1"),
    ("x_trace_id", None),  # filled with a fresh id
    ("_meta", {"region": "eu-west-1", "retries": 0}),
    ("schema_rev", 3),
)


@dataclass(frozen=True, slots=True)
class SimMessage:
    """One message to publish: where it goes, its exact bytes, and what it is meant to be."""

    channel: Channel
    key: bytes | None
    value: bytes
    kind: Kind
    event_id: str | None  # "{channel}:{source id}" for valid and duplicate; None for bad
    reason: str | None = None  # the dead-letter reason a bad message should earn


@dataclass(slots=True)
class _Person:
    customer_id: str | None
    email: str | None  # canonical (lower-case, trimmed); channels show it in varied forms
    anonymous_id: str
    visitor_id: str | None
    loyalty_card: str | None
    offset: timezone  # browser local time
    store_id: str
    currency: str
    plan: list[Channel]
    threads: int = 0
    closed: bool = False


@dataclass(slots=True)
class _Sim:
    """Shared state: the Random, the current event time, and counters for unique ids."""

    rng: random.Random
    now: datetime
    customers: int
    t: datetime = field(init=False)
    people: dict[int, _Person] = field(default_factory=dict)
    emails: set[str] = field(default_factory=set)
    cards: set[str] = field(default_factory=set)
    tickets: int = 0

    def __post_init__(self) -> None:
        self.t = self.now

    def uid(self) -> str:
        """-> a uuid-like id drawn from the Random (unique in practice: 122 random bits)."""
        return str(uuid.UUID(int=self.rng.getrandbits(128), version=4))

    def hex_id(self, prefix: str, digits: int = 16) -> str:
        """'v_' -> 'v_3f9a...' (digits hex characters)."""
        return f"{prefix}{self.rng.getrandbits(4 * digits):0{digits}x}"


# One step of a thread: channel, payload (a dict, serialized at the end), preferred Kafka key.
_Step = tuple[Channel, Payload, str | None]
_Thread = Iterator[_Step]


# --- time formats -------------------------------------------------------------------------


def _rfc3339(t: datetime, offset: timezone) -> str:
    """UTC datetime -> '2026-11-20T10:15:30.123Z' or '...+02:00' (milliseconds)."""
    text = t.astimezone(offset).isoformat(timespec="milliseconds")
    return text.removesuffix("+00:00") + "Z" if text.endswith("+00:00") else text


def _helpdesk(t: datetime, offset: timezone) -> str:
    """UTC datetime -> '2026-11-20 11:15:30.123456+01:00' (space, offset always present)."""
    return t.astimezone(offset).isoformat(sep=" ", timespec="microseconds")


def _epoch_ms(t: datetime) -> int:
    return (t - _EPOCH) // timedelta(milliseconds=1)


def _epoch_s(t: datetime) -> int:
    return (t - _EPOCH) // timedelta(seconds=1)


def _minutes(offset_minutes: int) -> timezone:
    return timezone(timedelta(minutes=offset_minutes))


# --- people -------------------------------------------------------------------------------


def _person(sim: _Sim, index: int) -> _Person:
    """Person index -> that person, created on first use (so huge pools cost nothing up front)."""
    person = sim.people.get(index)
    if person is not None:
        return person
    rng = sim.rng
    first, last = rng.choice(_FIRST), rng.choice(_LAST)
    email = None
    if rng.random() < 0.85:
        email = f"{first}.{last}@{rng.choice(_DOMAINS)}"
        while email in sim.emails:
            email = f"{first}.{last}{rng.randrange(1, 10_000)}@{rng.choice(_DOMAINS)}"
        sim.emails.add(email)
    card = None
    if rng.random() < 0.45:
        card = f"LC{rng.randrange(10**10):010d}"
        while card in sim.cards:
            card = f"LC{rng.randrange(10**10):010d}"
        sim.cards.add(card)
    store_number = rng.randrange(1, 41)
    person = _Person(
        customer_id=f"C{index + 1:06d}" if rng.random() < 0.6 else None,
        email=email,
        anonymous_id=sim.uid(),
        visitor_id=sim.hex_id("v_") if rng.random() < 0.75 else None,
        loyalty_card=card,
        offset=_minutes(rng.choice(_BROWSER_OFFSETS)),
        store_id=f"S{store_number:03d}",
        currency="USD" if store_number > 30 else "EUR",
        plan=[],
    )
    person.plan = _plan(rng, person)
    sim.people[index] = person
    return person


def _eligible(person: _Person) -> list[Channel]:
    """Person -> the channels whose format can carry one of their identifiers."""
    channels: list[Channel] = ["web"]
    if person.visitor_id or person.email or person.customer_id:
        channels.append("chat")
    if person.email:
        channels.append("support")
    if person.loyalty_card or person.customer_id:
        channels.append("store")
    return channels


def _plan(rng: random.Random, person: _Person) -> list[Channel]:
    """Person -> the order of their first threads: usually the website first, then the rest."""
    others = [c for c in _eligible(person) if c != "web"]
    rng.shuffle(others)
    return ["web", *others] if rng.random() < 0.75 else [*others, "web"]


def _pick_person(sim: _Sim) -> _Person:
    """-> a person; a few are very active, most appear now and then."""
    index = min(int(sim.customers * sim.rng.random() ** 1.8), sim.customers - 1)
    return _person(sim, index)


def _next_channel(rng: random.Random, person: _Person) -> Channel:
    """Person -> the channel of their next thread (planned first, then by habit)."""
    if person.threads < len(person.plan):
        return person.plan[person.threads]
    eligible = _eligible(person)
    weights = [{"web": 4, "chat": 2, "support": 2, "store": 3}[c] for c in eligible]
    return rng.choices(eligible, weights)[0]


def _shown_email(rng: random.Random, email: str) -> str:
    """Canonical e-mail -> the way a form or agent typed it (case, stray whitespace)."""
    roll = rng.random()
    if roll < 0.65:
        shown = email
    elif roll < 0.85:
        local, _, domain = email.partition("@")
        shown = ".".join(p.capitalize() for p in local.split(".")) + "@" + domain.capitalize()
    else:
        shown = email.upper()
    if rng.random() < 0.12:
        shown = rng.choice((" ", "  ", "\t")) + shown + rng.choice(("", " ", "\n"))
    return shown


# --- free text and scores -----------------------------------------------------------------


def _text(rng: random.Random, mood: float, person: _Person) -> str:
    """Mood in [-1, 1] -> a customer sentence, sometimes leaking an e-mail or phone number."""
    if mood > 0.3:
        text = rng.choice(_POSITIVE)
    elif mood < -0.3:
        text = rng.choice(_NEGATIVE)
    else:
        text = rng.choice(_NEUTRAL)
    if rng.random() < _PII_TEXT_SHARE:
        if person.email and rng.random() < 0.5:
            text += f" You can reach me at {person.email}."
        else:
            text += f" Please call me on {rng.choice(_PHONES)}."
    return text


def _nps(rng: random.Random) -> int:
    roll = rng.random()
    if roll < 0.45:
        return rng.randint(9, 10)
    if roll < 0.75:
        return rng.randint(7, 8)
    return rng.randint(0, 6)


def _csat(rng: random.Random) -> int:
    return rng.choices((1, 2, 3, 4, 5), (6, 8, 16, 35, 35))[0]


def _ces(rng: random.Random) -> int:
    return rng.choices((1, 2, 3, 4, 5, 6, 7), (4, 6, 8, 12, 20, 25, 25))[0]


def _mood(kind: str, score: int) -> float:
    """A score on its scale -> the mood of the comment that goes with it, in [-1, 1]."""
    low, high = {"nps": (0, 10), "csat": (1, 5), "ces": (1, 7)}[kind]
    return 2 * (score - low) / (high - low) - 1


# --- web ----------------------------------------------------------------------------------


def _web_event(
    sim: _Sim,
    person: _Person,
    type_: str,
    session_id: str | None,
    *,
    signed_in: bool,
    page: tuple[str, str | None] | None = None,
    survey: Payload | None = None,
) -> Payload:
    """One browser-tracker event (user_id and e-mail only once signed in)."""
    event: Payload = {
        "event_id": sim.uid(),
        "type": type_,
        "sent_at": _rfc3339(sim.t, person.offset),
        "anonymous_id": person.anonymous_id,
        "session_id": session_id,
    }
    if signed_in:
        event["user_id"] = person.customer_id
        if person.email and sim.rng.random() < 0.5:
            event["email"] = _shown_email(sim.rng, person.email)
    if page is not None:
        event["page"] = {"url": page[0], "title": page[1]}
    if survey is not None:
        event["survey"] = survey
    return event


def _web_survey(sim: _Sim, person: _Person) -> Payload:
    """-> a survey block: nps (most), csat or ces, with a comment now and then."""
    kind = sim.rng.choices(("nps", "csat", "ces"), (5, 3, 2))[0]
    score = {"nps": _nps, "csat": _csat, "ces": _ces}[kind](sim.rng)
    comment = None
    if sim.rng.random() < 0.4:
        comment = _text(sim.rng, _mood(kind, score), person)
    return {"kind": kind, "score": score, "comment": comment}


def _web_session(sim: _Sim, person: _Person) -> _Thread:
    """Person -> a browsing session: anonymous pages, maybe sign-in, forms, a survey."""
    rng = sim.rng
    session_id = sim.uid() if rng.random() < 0.95 else None
    can_sign_in = person.customer_id is not None or person.email is not None
    signed_in = False
    for _ in range(rng.randint(1, 4)):
        page = rng.choice(_PAGES)
        event = _web_event(sim, person, "page_view", session_id, signed_in=False, page=page)
        yield "web", event, person.anonymous_id
    if can_sign_in and rng.random() < 0.6:
        signed_in = True
        event = _web_event(sim, person, "sign_in", session_id, signed_in=True, page=_PAGES[9])
        if person.email and "email" not in event:
            event["email"] = _shown_email(rng, person.email)  # sign-in always names the person
        yield "web", event, person.customer_id or person.anonymous_id
    key = (person.customer_id if signed_in else None) or person.anonymous_id
    for _ in range(rng.randint(0, 3)):
        event = _web_event(
            sim, person, "page_view", session_id, signed_in=signed_in, page=rng.choice(_PAGES)
        )
        yield "web", event, key
    if rng.random() < 0.15:
        event = _web_event(
            sim, person, "form_submit", session_id, signed_in=signed_in, page=_PAGES[7]
        )
        if person.email:
            event["email"] = _shown_email(rng, person.email)
        yield "web", event, key
    if rng.random() < 0.25:
        survey = _web_survey(sim, person)
        event = _web_event(
            sim, person, "survey_response", session_id, signed_in=signed_in, survey=survey
        )
        yield "web", event, key
    if signed_in and person.customer_id and not person.closed and rng.random() < 0.02:
        person.closed = True
        yield "web", _web_event(sim, person, "account_closed", session_id, signed_in=True), key


# --- chat ---------------------------------------------------------------------------------


def _chat_customer(rng: random.Random, person: _Person) -> Payload:
    """Person -> the chat platform's customer block (at least one identifier)."""
    customer: Payload = {"customer_id": None, "email": None, "visitor_id": person.visitor_id}
    if person.email and (rng.random() < 0.7 or not person.visitor_id):
        customer["email"] = _shown_email(rng, person.email)
    if person.customer_id and (rng.random() < 0.4 or not (customer["email"] or person.visitor_id)):
        customer["customer_id"] = person.customer_id
    return customer


def _chat_event(
    sim: _Sim,
    conversation: str,
    customer: Payload,
    event: str,
    author: str | None = None,
    text: str | None = None,
    rating: int | None = None,
) -> Payload:
    """One chat webhook event."""
    payload: Payload = {
        "id": sim.uid(),
        "conversation_id": conversation,
        "event": event,
        "timestamp": _epoch_ms(sim.t),
        "customer": customer,
        "author": author,
        "text": text,
    }
    if rating is not None:
        payload["rating"] = rating
    return payload


def _chat_conversation(sim: _Sim, person: _Person) -> _Thread:
    """Person -> a conversation: bot greeting, messages, maybe a handoff, close, maybe a rating."""
    rng = sim.rng
    conversation = sim.hex_id("conv_", 12)
    customer = _chat_customer(rng, person)
    key = person.customer_id or person.visitor_id
    mood = rng.uniform(-1, 1)

    def event(name: str, author: str, text: str | None = None, rating: int | None = None) -> _Step:
        return "chat", _chat_event(sim, conversation, customer, name, author, text, rating), key

    yield event("conversation_started", "customer")
    yield event("message", "bot", rng.choice(_BOT_LINES))
    yield event("message", "customer", _text(rng, mood, person))
    helper = "bot"
    if rng.random() < 0.4:
        helper = "agent"
        yield event("handoff", "bot")
    for _ in range(rng.randint(1, 3)):
        yield event(
            "message", helper, rng.choice(_AGENT_LINES if helper == "agent" else _BOT_LINES)
        )
        if rng.random() < 0.6:
            yield event("message", "customer", _text(rng, mood, person))
    yield event("conversation_closed", helper)
    if rng.random() < 0.35:
        rating = _csat(rng)
        remark = _text(rng, _mood("csat", rating), person) if rng.random() < 0.3 else None
        yield event("rating", "customer", remark, rating)


# --- support ------------------------------------------------------------------------------


def _support_event(
    sim: _Sim,
    ticket: str,
    requester: Payload,
    offset: timezone,
    action: str,
    comment: str | None = None,
    survey: Payload | None = None,
) -> Payload:
    """One help-desk event."""
    payload: Payload = {
        "event_id": sim.hex_id("evt_", 20),
        "ticket_id": ticket,
        "action": action,
        "occurred_at": _helpdesk(sim.t, offset),
        "requester": requester,
        "comment": comment,
    }
    if survey is not None:
        payload["survey"] = survey
    return payload


def _support_survey(rng: random.Random) -> Payload:
    """-> a ticket survey with csat, ces or both."""
    roll = rng.random()
    return {
        "csat": _csat(rng) if roll < 0.8 else None,
        "ces": _ces(rng) if roll > 0.5 else None,
    }


def _new_ticket(sim: _Sim, email: str, customer_id: str | None) -> tuple[str, Payload, timezone]:
    """A requester -> (unique ticket id, requester block, help-desk offset)."""
    sim.tickets += 1
    requester: Payload = {"email": _shown_email(sim.rng, email), "customer_id": None}
    if customer_id and sim.rng.random() < 0.5:
        requester["customer_id"] = customer_id
    offset = _minutes(sim.rng.choice(_DESK_OFFSETS))
    return f"T{100_000 + sim.tickets}", requester, offset


def _support_ticket(sim: _Sim, person: _Person) -> _Thread:
    """Person -> a ticket: created, replies, solved, sometimes reopened, maybe a survey."""
    rng = sim.rng
    if person.email is None:  # _eligible routes only people with an e-mail here
        return
    ticket, requester, offset = _new_ticket(sim, person.email, person.customer_id)
    key = person.customer_id or ticket
    mood = rng.uniform(-1, 0.6)  # people rarely open tickets to say thanks

    def event(action: str, comment: str | None = None, survey: Payload | None = None) -> _Step:
        return (
            "support",
            _support_event(sim, ticket, requester, offset, action, comment, survey),
            key,
        )

    yield event("created", _text(rng, mood, person))
    yield event("agent_reply", rng.choice(_AGENT_LINES))
    for _ in range(rng.randint(0, 2)):
        yield event("customer_reply", _text(rng, mood, person))
        yield event("agent_reply", rng.choice(_AGENT_LINES))
    yield event("solved")
    if rng.random() < 0.15:
        yield event("reopened", _text(rng, -0.8, person))
        yield event("agent_reply", rng.choice(_AGENT_LINES))
        yield event("solved")
    if rng.random() < 0.4:
        survey = _support_survey(rng)
        score = survey["csat"] if survey["csat"] is not None else 3
        comment = _text(rng, _mood("csat", score), person) if rng.random() < 0.4 else None
        yield event("survey", comment, survey)


# --- store --------------------------------------------------------------------------------


def _store_event(
    sim: _Sim,
    person: _Person,
    kind: str,
    *,
    amount: Decimal | None = None,
    nps: int | None = None,
    csat: int | None = None,
) -> Payload:
    """One point-of-sale or kiosk event (loyalty card and/or customer id)."""
    rng = sim.rng
    card = person.loyalty_card
    customer_id = person.customer_id if (card is None or rng.random() < 0.4) else None
    payload: Payload = {
        "txn_id": f"{person.store_id}-{sim.hex_id('', 12)}",
        "store_id": person.store_id,
        "kind": kind,
        "time": _epoch_s(sim.t),
        "loyalty_card": card,
        "customer_id": customer_id,
    }
    if amount is not None:
        payload["amount"] = str(amount.quantize(_CENT))
        payload["currency"] = person.currency
    if nps is not None:
        payload["nps"] = nps
    if csat is not None:
        payload["csat"] = csat
    return payload


def _price(rng: random.Random) -> Decimal:
    """-> a shelf price such as 19.99 or 129.00."""
    cents = rng.choice((99, 99, 95, 49, 0))
    return Decimal(rng.randint(3, 180)) + Decimal(cents) / 100


def _kiosk_scores(rng: random.Random) -> tuple[int | None, int | None]:
    """-> (nps, csat) with at least one answered."""
    roll = rng.random()
    return (_nps(rng) if roll < 0.7 else None, _csat(rng) if roll > 0.4 else None)


def _store_visits(sim: _Sim, person: _Person) -> _Thread:
    """Person -> a few store visits: a purchase, maybe a kiosk survey, maybe a later return."""
    rng = sim.rng
    key = person.customer_id or person.store_id  # the till knows no better; cards are PII
    for _ in range(rng.randint(1, 4)):
        basket = sum((_price(rng) for _ in range(rng.randint(1, 4))), Decimal(0))
        yield "store", _store_event(sim, person, "purchase", amount=basket), key
        if rng.random() < 0.25:
            nps, csat = _kiosk_scores(rng)
            yield "store", _store_event(sim, person, "kiosk_survey", nps=nps, csat=csat), key
        if rng.random() < 0.1:
            refund = basket if rng.random() < 0.6 else _price(rng).min(basket)
            yield "store", _store_event(sim, person, "return", amount=refund), key


_THREADS: dict[Channel, Callable[[_Sim, _Person], _Thread]] = {
    "web": _web_session,
    "chat": _chat_conversation,
    "support": _support_ticket,
    "store": _store_visits,
}


def _new_thread(sim: _Sim) -> _Thread:
    """-> the next thread of a (skewed) random person, on the channel their journey is at."""
    person = _pick_person(sim)
    channel = _next_channel(sim.rng, person)
    person.threads += 1
    return _THREADS[channel](sim, person)


# --- bad messages -------------------------------------------------------------------------


def _survey_payload(sim: _Sim, channel: Channel, person: _Person) -> tuple[Payload, str]:
    """Channel -> (a complete, valid survey-type event, the name of its score field)."""
    rng = sim.rng
    if channel == "web":
        survey = {"kind": "nps", "score": _nps(rng), "comment": _text(rng, 0.0, person)}
        event = _web_event(sim, person, "survey_response", sim.uid(), signed_in=False)
        event["survey"] = survey
        return event, "survey"
    if channel == "chat":
        customer = {"customer_id": None, "email": None, "visitor_id": sim.hex_id("v_")}
        text = _text(rng, 0.0, person)
        conversation = sim.hex_id("conv_", 12)
        return _chat_event(sim, conversation, customer, "rating", "customer", text, 4), "rating"
    if channel == "support":
        ticket = f"T{sim.rng.randrange(900_000, 999_999)}"
        requester = {"email": "someone@example.com", "customer_id": None}
        survey = {"csat": _csat(rng), "ces": None}
        comment = _text(rng, 0.0, person)
        return _support_event(sim, ticket, requester, UTC, "survey", comment, survey), "survey"
    stand_in = _Person(
        customer_id=None,
        email=None,
        anonymous_id=sim.uid(),
        visitor_id=None,
        loyalty_card=f"LC{rng.randrange(10**10):010d}",
        offset=UTC,
        store_id=person.store_id,
        currency=person.currency,
        plan=[],
    )
    return _store_event(sim, stand_in, "kiosk_survey", nps=_nps(rng)), "nps"


def _break_score(payload: Payload, score_field: str) -> None:
    """Valid survey-type event -> the same event with one score off its scale."""
    if score_field == "survey" and "kind" in payload[score_field]:  # web: nps 0..10
        payload["survey"]["score"] = 11
    elif score_field == "survey":  # support: csat 1..5
        payload["survey"]["csat"] = 6
    elif score_field == "rating":  # chat: 1..5
        payload["rating"] = 0
    else:  # store: nps 0..10
        payload["nps"] = 12


def _future(sim: _Sim, channel: Channel, payload: Payload) -> None:
    """Event -> the same event stamped about a day after `now`."""
    t = sim.now + timedelta(days=1, seconds=sim.rng.randrange(-3600, 3600))
    if channel == "web":
        payload["sent_at"] = _rfc3339(t, UTC)
    elif channel == "chat":
        payload["timestamp"] = _epoch_ms(t)
    elif channel == "support":
        payload["occurred_at"] = _helpdesk(t, _minutes(60))
    else:
        payload["time"] = _epoch_s(t)


_REQUIRED: dict[Channel, tuple[str, ...]] = {
    "web": ("type", "sent_at", "anonymous_id"),
    "chat": ("conversation_id", "event", "timestamp", "customer"),
    "support": ("ticket_id", "action", "occurred_at", "requester"),
    "store": ("store_id", "kind", "time"),
}


def _bad(sim: _Sim, number: int) -> tuple[Channel, bytes, str, str]:
    """The n-th bad message -> (channel, bytes, class, key); classes and channels both rotate."""
    bad_class = BAD_CLASSES[number % len(BAD_CLASSES)]
    channel = CHANNELS[(number // len(BAD_CLASSES)) % len(CHANNELS)]
    person = _pick_person(sim)
    key = person.customer_id or person.anonymous_id
    payload, score_field = _survey_payload(sim, channel, person)
    if bad_class == "invalid_json":
        # A cut-off object is never valid JSON: the closing brace is missing.
        value = orjson.dumps(payload)
        return channel, value[: sim.rng.randrange(1, len(value) - 1)], bad_class, key
    if bad_class == "not_an_object":
        return channel, orjson.dumps([payload]), bad_class, key
    if bad_class == "missing_field":
        del payload[sim.rng.choice(_REQUIRED[channel])]
    elif bad_class == "score_out_of_range":
        _break_score(payload, score_field)
    elif bad_class == "timestamp_in_future":
        _future(sim, channel, payload)
    else:
        payload["attachment_text"] = "x" * OVERSIZED_BYTES  # e.g. a pasted log file
    return channel, orjson.dumps(payload), bad_class, key


# --- the stream ---------------------------------------------------------------------------


@dataclass(slots=True)
class _Sent:
    t: datetime
    message: SimMessage
    alternate_key: bytes | None


def _with_extra_field(sim: _Sim, payload: Payload) -> None:
    name, value = sim.rng.choice(_EXTRA_FIELDS)
    payload[name] = sim.uid() if value is None else value


def _key(sim: _Sim, preferred: str | None) -> bytes | None:
    if preferred is None or sim.rng.random() < _NO_KEY_SHARE:
        return None
    return preferred.encode()


def _time_grid(now: datetime, span: timedelta) -> tuple[datetime, datetime]:
    """[now - span, now] -> the whole-second range inside it, so epoch seconds never leave it."""
    low = now - span
    whole_low = low.replace(microsecond=0)
    if whole_low < low:
        whole_low += timedelta(seconds=1)
    whole_high = now.replace(microsecond=0)
    return (whole_low, whole_high) if whole_low < whole_high else (low, now)


def generate(
    count: int,
    *,
    customers: int = 1000,
    seed: int = 0,
    now: datetime,
    span: timedelta = timedelta(days=3),
    dup_share: float = 0.02,
    bad_share: float = 0.01,
) -> Iterator[SimMessage]:
    """(count, people, seed, now) -> `count` raw messages with event times in [now - span, now].

    Deterministic: the same arguments give the same bytes. Times rise across the stream with a
    little jitter; `dup_share` are byte-exact re-sends of a recent valid message and `bad_share`
    are bad, cycling through BAD_CLASSES.
    """
    if count < 0:
        raise ValueError("count must not be negative")
    if customers < 1:
        raise ValueError("customers must be at least 1")
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    if span <= timedelta(0):
        raise ValueError("span must be positive")
    if not (0 <= dup_share <= 1 and 0 <= bad_share <= 1 and dup_share + bad_share <= 1):
        raise ValueError("dup_share and bad_share must be shares in [0, 1] adding up to <= 1")
    return _stream(
        _Sim(rng=random.Random(seed), now=now.astimezone(UTC), customers=customers),
        count,
        span,
        dup_share,
        bad_share,
    )


def _stream(
    sim: _Sim, count: int, span: timedelta, dup_share: float, bad_share: float
) -> Iterator[SimMessage]:
    """The generator behind `generate`, once its arguments are checked."""
    rng = sim.rng
    low, high = _time_grid(sim.now, span)
    step = (high - low) / max(count, 1)
    active: list[_Thread] = []
    recent: deque[_Sent] = deque(maxlen=_RESEND_CANDIDATES)
    bad_count = 0
    for position in range(count):
        base = low + step * (position + 1)
        # Small jitter: delivery is not perfectly ordered, but never before the range starts.
        sim.t = max(low, min(high, base - step * 2 * rng.random()))
        while recent and recent[0].t < sim.t - _RESEND_WINDOW:
            recent.popleft()
        roll = rng.random()
        if roll < bad_share:
            channel, value, bad_class, bad_key = _bad(sim, bad_count)
            bad_count += 1
            yield SimMessage(
                channel, _key(sim, bad_key), value, "bad", None, BAD_REASONS[bad_class]
            )
            continue
        if roll < bad_share + dup_share and recent:
            original = rng.choice(recent)
            key = original.message.key
            if rng.random() < 0.3:
                key = original.alternate_key
            yield replace(original.message, key=key, kind="duplicate")
            continue
        channel, payload, preferred = _next_step(sim, active)
        if rng.random() < _EXTRA_FIELD_SHARE:
            _with_extra_field(sim, payload)
        key = _key(sim, preferred)
        event_id = f"{channel}:{payload[SOURCE_ID_FIELD[channel]]}"
        message = SimMessage(channel, key, orjson.dumps(payload), "valid", event_id)
        # A re-send through another producer may carry another key (or none).
        alternate = preferred.encode() if key is None and preferred else None
        recent.append(_Sent(sim.t, message, alternate))
        yield message


def _next_step(sim: _Sim, active: list[_Thread]) -> _Step:
    """Active threads -> the next event of one of them, starting new threads as others end."""
    while True:
        while len(active) < _ACTIVE_THREADS:
            active.append(_new_thread(sim))
        index = sim.rng.randrange(len(active))
        step = next(active[index], None)
        if step is not None:
            return step
        active.pop(index)


# --- publishing ---------------------------------------------------------------------------


def topic_for(prefix: str, channel: Channel) -> str:
    """('cx', 'web') -> 'cx.raw.web'."""
    return f"{prefix}.raw.{channel}"


async def publish(
    settings: Settings,
    messages: Iterable[SimMessage],
    *,
    rate: float | None = None,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Messages -> published to their raw topics (acks=all); returns how many were acknowledged.

    `rate` is messages per second (None: as fast as the broker takes them). Sends are not awaited
    one by one; their delivery futures are awaited in chunks, and `progress` gets the running
    total after each chunk.
    """
    from aiokafka import AIOKafkaProducer

    from service.kafka import kafka_client_kwargs

    if rate is not None and rate <= 0:
        raise ValueError("rate must be positive (messages per second) or None")
    chunk = 1000 if rate is None else max(1, min(1000, int(rate / 10)))
    # Merged as a dict: the security kwargs may repeat bootstrap_servers, and must not weaken acks.
    options: dict[str, Any] = {
        "bootstrap_servers": settings.kafka_bootstrap_servers,
        **kafka_client_kwargs(settings),
        "acks": "all",
        "linger_ms": 5,
    }
    producer = AIOKafkaProducer(**options)
    loop = asyncio.get_running_loop()
    published = 0
    pending: list[asyncio.Future[Any]] = []

    async def settle() -> None:
        nonlocal published
        await asyncio.gather(*pending)
        published += len(pending)
        pending.clear()
        if progress is not None:
            progress(published)

    try:
        await producer.start()
        started = loop.time()  # pace from when the broker is reachable, not from connecting
        for position, message in enumerate(messages):
            if rate is not None:
                due = started + position / rate
                if pending and due - loop.time() > 0.05:
                    await settle()  # report progress while idling, not only per full chunk
                delay = due - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
            topic = topic_for(settings.topic_prefix, message.channel)
            pending.append(await producer.send(topic, message.value, key=message.key))
            if len(pending) >= chunk:
                await settle()
        if pending:
            await settle()
        await producer.flush()
    finally:
        await producer.stop()  # stop() also flushes whatever is still buffered
    return published
