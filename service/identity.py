"""Identity: the identifiers an event shows -> the customer they belong to.

Identifiers that appear together in one event are linked; linked identifiers form one customer
(a connected component). Its key is its customer_id where one is known, else 'anon-' + the
smallest keyed hash among its identifiers. That rule depends only on the component, never on
the order events arrived in.

`IdentityGraph` keeps the components in any string-keyed mapping (a Faust table in the
worker, a dict in tests). Keys in that mapping:
  'i|{kind}|{value}' -> customer key the identifier belongs to
  'c|{key}'          -> {"members": [...], "cid": customer_id or None, "aliases": [...]}
  'a|{old key}'      -> {"to": surviving key, "by": event id of the linking event}
`FiledKeys` keeps, in the same mapping, the key each recent event was first filed under:
  'e|{slot}'         -> {"id": event id, "key": customer key, "n": sequence number}
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from service.canonical import Identifier, IdKind
from service.pii import keyed_hash, normalize_email
from service.raw import ChatEvent, RawEvent, StoreEvent, SupportEvent, WebEvent

# Values that upstream systems send when they have no identifier. Linking through one of them
# would merge every anonymous visitor into one customer (PostHog and Segment guard the same).
PLACEHOLDERS = frozenset(
    {
        "", "0", "-1", "null", "none", "nil", "undefined", "nan", "n/a", "na", "unknown",
        "guest", "anonymous", "anon", "user", "test", "default", "[object object]", "false",
        "true", "{}", "[]", "00000000-0000-0000-0000-000000000000",
    }
)  # fmt: skip
_PLACEHOLDER_MAILBOXES = frozenset(
    {"test", "noreply", "no-reply", "donotreply", "do-not-reply", "none", "null", "email",
     "user", "guest", "anonymous", "unknown", "example", "foo", "info", "nobody"}
)  # fmt: skip
_PLACEHOLDER_DOMAINS = frozenset({"example.com", "test.com", "email.com", "domain.com"})
_EMAIL_SHAPE = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")


def is_placeholder(kind: IdKind, value: str) -> bool:
    """(kind, raw value) -> True for a value that identifies nobody (never linked)."""
    text = value.strip().lower()
    if text in PLACEHOLDERS:
        return True
    if kind == "email":
        if not _EMAIL_SHAPE.match(text):
            return True
        mailbox, _, domain = text.partition("@")
        return mailbox in _PLACEHOLDER_MAILBOXES and (
            domain in _PLACEHOLDER_DOMAINS or mailbox in {"test", "noreply", "no-reply"}
        )
    return False


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


def identifiers_of(event: RawEvent, pii_key: bytes) -> tuple[tuple[Identifier, ...], int]:
    """Raw event -> (its usable identifiers, how many placeholders were dropped). All but
    customer_id become keyed hashes; e-mail addresses are normalized first."""
    found: list[Identifier] = []
    placeholders = 0
    for kind, value in _raw_identifiers(event):
        if value is None:
            continue
        if kind == "email":
            value = normalize_email(value)
        if is_placeholder(kind, value):
            placeholders += 1
            continue
        shown = value if kind == "customer_id" else keyed_hash(pii_key, kind, value)
        found.append(Identifier(kind=kind, value=shown))
    return tuple(found), placeholders


def component_key(members: Sequence[str], customer_id: str | None) -> str:
    """A component's key: its customer_id, else 'anon-' + its smallest identifier hash."""
    if customer_id is not None:
        return customer_id
    return "anon-" + min(member.rpartition("|")[2] for member in members)[:32]


def solo_key(event_id: str, pii_key: bytes) -> str:
    """Key of an event with no usable identifier: a customer of its own."""
    return "anon-" + keyed_hash(pii_key, "event", event_id)[:32]


def provisional_key(identifiers: Sequence[Identifier]) -> str | None:
    """Identifiers of one event, taken alone -> the key they would form (None if none)."""
    if not identifiers:
        return None
    members = [_member(identifier) for identifier in identifiers]
    cid = next((i.value for i in identifiers if i.kind == "customer_id"), None)
    return component_key(members, cid)


def _member(identifier: Identifier) -> str:
    return f"i|{identifier.kind}|{identifier.value}"


@dataclass
class Resolution:
    """What linking one event did: its customer key, the keys merged away, refusals."""

    key: str
    merges: list[str] = field(default_factory=list)  # old keys now aliases of `key`
    refused: int = 0
    aliases: list[str] = field(default_factory=list)  # every alias of `key`, merges included


@dataclass
class Forgotten:
    """What forgetting a customer removed."""

    key: str
    aliases: list[str]
    identifiers: int


class IdentityGraph:
    """Connected components of identifiers, in a string-keyed mapping (see module doc)."""

    def __init__(self, store: MutableMapping[str, Any]) -> None:
        self.store = store

    def surviving(self, key: str) -> str | None:
        """A customer key or an alias -> the current key (None if unknown)."""
        seen = 0
        while seen < 64:  # alias chains are short; the bound guards against a corrupt loop
            if f"c|{key}" in self.store:
                return key
            alias = self.store.get(f"a|{key}")
            if alias is None:
                return None
            key = str(alias["to"])
            seen += 1
        return None

    def component(self, key: str) -> dict[str, Any] | None:
        value = self.store.get(f"c|{key}")
        return None if value is None else dict(value)

    def link(self, identifiers: Sequence[Identifier], event_id: str) -> Resolution:
        """Link the identifiers of one event -> the customer key the event belongs to.

        Two different known customer_ids are never merged: a component whose customer_id
        differs from the event's (or from another candidate's) is left apart and counted as a
        refused merge."""
        if not identifiers:
            raise ValueError("an event with no identifier has a key of its own (solo_key)")
        members = list(dict.fromkeys(_member(i) for i in identifiers))
        event_cid = next((i.value for i in identifiers if i.kind == "customer_id"), None)
        # Each key is read once (a store read is a RocksDB get and a JSON decode).
        owners = {m: self.store.get(m) for m in members}
        components: dict[str, dict[str, Any]] = {}
        for owner in dict.fromkeys(owners.values()):
            if owner is not None and (found := self.store.get(f"c|{owner}")) is not None:
                components[owner] = found
        # A pointer to a component that is not there is what a crash between the writes of
        # one link leaves (each key is its own changelog record): that identifier is new again.
        roots = list(components)
        cids = {root: components[root]["cid"] for root in roots}

        # Which customer_id the result carries: the event's own, else the one the candidates
        # agree on; candidates with another customer_id are refused.
        chosen = event_cid
        if chosen is None:
            known = sorted({cid for cid in cids.values() if cid is not None})
            chosen = known[0] if known else None
        joined = [root for root in roots if cids[root] in (None, chosen)]
        refused = [root for root in roots if root not in joined]
        # An identifier already owned by a refused customer stays there.
        owned_elsewhere = {m for m in members if owners[m] in refused}
        new_members = [m for m in members if owners[m] not in roots]

        all_members: list[str] = []
        aliases: list[str] = []
        for root in joined:
            all_members.extend(components[root]["members"])
            aliases.extend(components[root]["aliases"])
        all_members.extend(new_members)

        key = component_key(all_members, chosen)
        merged = [root for root in joined if root != key]
        for old in merged:
            del self.store[f"c|{old}"]
            self.store[f"a|{old}"] = {"to": key, "by": event_id}
        all_aliases = sorted(set(aliases) | set(merged))
        linked = {"members": sorted(set(all_members)), "cid": chosen, "aliases": all_aliases}
        if key not in joined or components[key] != linked:  # most events change nothing
            self.store[f"c|{key}"] = linked
        for member in set(all_members) - owned_elsewhere:
            # Members of a joined component not shown by this event: their pointers are read
            # here; the event's own were read above.
            owner = owners[member] if member in owners else self.store.get(member)
            if owner != key:
                self.store[member] = key
        return Resolution(key, merged, len(refused), all_aliases)

    def merges_by(self, key: str, event_id: str, aliases: list[str] | None = None) -> list[str]:
        """The aliases of a customer that one event's link created (to re-send on replay).
        `aliases`: the customer's, when known (`Resolution.aliases`), else read."""
        if aliases is None:
            component = self.store.get(f"c|{key}")
            aliases = [] if component is None else component["aliases"]
        return [
            alias for alias in aliases if (self.store.get(f"a|{alias}") or {}).get("by") == event_id
        ]

    def forget(self, key: str) -> Forgotten | None:
        """Remove a customer's identifiers and aliases -> what was removed (None: unknown)."""
        current = self.surviving(key)
        if current is None:
            return None
        component = self.store.pop(f"c|{current}")
        for member in component["members"]:
            if self.store.get(member) == current:
                del self.store[member]
        for alias in component["aliases"]:
            self.store.pop(f"a|{alias}", None)
        return Forgotten(current, list(component["aliases"]), len(component["members"]))


# How many recent events `FiledKeys` remembers: far more than the identity stage reads and does
# not commit (about a second of events) before a crash or a rebalance.
FILED_KEYS_KEPT = 50_000


class FiledKeys:
    """The customer key each of the last `capacity` events was first filed under.

    A replay (what the identity stage had read but not committed when its worker crashed or
    lost the partition) links nothing new, but a later event may have moved its identifiers
    to another key since. Filed again under that key, the event would come out twice with two
    different keys, and the customer stage could count it twice (the merge bringing its first
    record over may still be on its way). Filed under its first key, it meets its first record
    (or follows that key's merge) and changes nothing.

    Forgetting a customer keeps its events' slots but drops their key: a copy of one of them
    read again after a crash (from any stage before this one, which re-sends what it had not
    committed) is recognised and dropped (`forgotten`), instead of filing the person again
    after the forget.

    Kept as a ring of `capacity` slots in the mapping (one write per event, no deletes);
    the in-memory index is rebuilt from the slots after each assignment (`reset`)."""

    def __init__(self, store: MutableMapping[str, Any], capacity: int = FILED_KEYS_KEPT) -> None:
        self.store = store
        self.capacity = capacity
        # id -> (key, n), oldest first; key None: filed under a customer since forgotten
        self._index: OrderedDict[str, tuple[str | None, int]] | None = None
        self._next = 0

    def reset(self) -> None:
        """Forget the in-memory index (the partition was revoked): rebuilt at the next use."""
        self._index = None

    def _loaded(self) -> OrderedDict[str, tuple[str | None, int]]:
        if self._index is None:
            found = [
                value for slot in range(self.capacity) if (value := self.store.get(f"e|{slot}"))
            ]
            found.sort(key=lambda value: int(value["n"]))
            self._index = OrderedDict()
            for v in found:  # an id in two slots (filed again after a forget): the newer one
                self._index.pop(v["id"], None)
                self._index[v["id"]] = (None if v["key"] is None else str(v["key"]), int(v["n"]))
            self._next = int(found[-1]["n"]) + 1 if found else 0
        return self._index

    def first(self, event_id: str, key: str) -> str:
        """An event and the key it resolves to now -> the key it was first filed under (this
        one, remembered, when the event is new)."""
        index = self._loaded()
        known = index.get(event_id)
        if known is not None:
            if known[0] is not None:
                return known[0]
            del index[event_id]  # filed again after a forget: remembered anew
        n = self._next
        self._next += 1
        while index:  # the event whose slot this one takes, if still there, is the oldest
            oldest, (_, seq) = next(iter(index.items()))
            if seq > n - self.capacity:
                break
            del index[oldest]
        self.store[f"e|{n % self.capacity}"] = {"id": event_id, "key": key, "n": n}
        index[event_id] = (key, n)
        return key

    def forgotten(self, event_id: str) -> bool:
        """Whether an event was filed under a customer forgotten since."""
        known = self._loaded().get(event_id)
        return known is not None and known[0] is None

    def forget(self, keys: set[str]) -> None:
        """Drop the key of the events filed under any of `keys` (a forgotten customer and its
        aliases), keeping their ids as forgotten."""
        index = self._loaded()
        for event_id, (key, n) in list(index.items()):
            if key is not None and key in keys:
                index[event_id] = (None, n)
                self.store[f"e|{n % self.capacity}"] = {"id": event_id, "key": None, "n": n}
