"""Identity: the identifiers an event shows -> the customer key it belongs to.

`provisional_key` is the strongest-identifier rule used until identity stitching resolves
keys across events; `Resolver` is the seam the stitching stage plugs into.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from service.canonical import Identifier, IdKind
from service.pii import keyed_hash, normalize_email
from service.raw import ChatEvent, RawEvent, StoreEvent, SupportEvent, WebEvent

# Which identifier names an anonymous customer, strongest first.
_STRENGTH: tuple[IdKind, ...] = ("email", "loyalty_card", "anonymous_id", "visitor_id")


class Resolver(Protocol):
    """Identifiers of one event -> the customer key to file it under."""

    def resolve(self, identifiers: Sequence[Identifier]) -> str: ...


def _raw_identifiers(event: RawEvent) -> list[tuple[IdKind, str | None]]:
    match event:
        case WebEvent():
            return [
                ("customer_id", event.user_id),
                ("email", event.email),
                ("anonymous_id", event.anonymous_id),
            ]
        case ChatEvent():
            customer = event.customer
            return [
                ("customer_id", customer.customer_id),
                ("email", customer.email),
                ("visitor_id", customer.visitor_id),
            ]
        case SupportEvent():
            return [
                ("customer_id", event.requester.customer_id),
                ("email", event.requester.email),
            ]
        case StoreEvent():
            return [("customer_id", event.customer_id), ("loyalty_card", event.loyalty_card)]


def identifiers_of(event: RawEvent, pii_key: bytes) -> tuple[Identifier, ...]:
    """Raw event -> its identifiers; all but customer_id as keyed hashes, e-mail normalized."""
    found: list[Identifier] = []
    for kind, value in _raw_identifiers(event):
        if value is None:
            continue
        if kind == "email":
            value = normalize_email(value)
        if not value.strip():
            continue
        shown = value if kind == "customer_id" else keyed_hash(pii_key, kind, value)
        found.append(Identifier(kind=kind, value=shown))
    return tuple(found)


def provisional_key(identifiers: Sequence[Identifier]) -> str:
    """Identifiers -> customer_id if present, else 'anon-' + the strongest one's hash."""
    by_kind = {identifier.kind: identifier.value for identifier in identifiers}
    if "customer_id" in by_kind:
        return by_kind["customer_id"]
    for kind in _STRENGTH:
        if kind in by_kind:
            return f"anon-{by_kind[kind][:32]}"
    # Every raw model requires at least one identifier, so this is a broken invariant.
    raise ValueError("event carries no identifier")


class ProvisionalResolver:
    """The strongest-identifier rule as a `Resolver` (no state, no stitching)."""

    def resolve(self, identifiers: Sequence[Identifier]) -> str:
        return provisional_key(identifiers)
