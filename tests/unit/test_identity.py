"""Identity stitching (contract section 5): placeholders, IdentityGraph linking, merges, the
customer_id guard, forgetting, and order independence checked against an independent
union-find."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.canonical import Identifier
from service.identity import (
    IdentityGraph,
    component_key,
    is_placeholder,
    provisional_key,
    solo_key,
)
from tests.unit._golden import PII_KEY, REPEATABLE, hmac_hex

pytestmark = pytest.mark.unit

FAST = settings(REPEATABLE, max_examples=60)


def ident(kind: str, raw: str) -> Identifier:
    """A raw identifier as the service shows it: customer_id as is, others keyed hashes."""
    value = raw if kind == "customer_id" else hmac_hex(kind, raw)
    return Identifier(kind=kind, value=value)  # type: ignore[arg-type]


def cid(value: str) -> Identifier:
    return ident("customer_id", value)


def member(identifier: Identifier) -> str:
    return f"i|{identifier.kind}|{identifier.value}"


def anon(*identifiers: Identifier) -> str:
    """The anonymous key rule, written here independently of the service."""
    return "anon-" + min(i.value for i in identifiers)[:32]


# ---------------------------------------------------------------------------- placeholders


@pytest.mark.parametrize(
    ("kind", "value"),
    [
        ("customer_id", "null"),
        ("customer_id", "NULL"),
        ("customer_id", " undefined "),
        ("customer_id", "0"),
        ("customer_id", "-1"),
        ("customer_id", ""),
        ("customer_id", "   "),
        ("customer_id", "guest"),
        ("customer_id", "Anonymous"),
        ("customer_id", "[object Object]"),
        ("customer_id", "00000000-0000-0000-0000-000000000000"),
        ("anonymous_id", "none"),
        ("anonymous_id", "N/A"),
        ("visitor_id", "unknown"),
        ("visitor_id", "nan"),
        ("loyalty_card", "0"),
        ("loyalty_card", "false"),
        ("email", "test@example.com"),
        ("email", "TEST@Example.com"),
        ("email", "noreply@x.org"),
        ("email", "no-reply@shop.co.uk"),
        ("email", "test@acme.io"),
        ("email", "info@example.com"),
        ("email", "guest@test.com"),
        ("email", "null"),
        ("email", "not-an-email"),
        ("email", "ana@localhost"),
        ("email", "@example.com"),
    ],
)
def test_placeholders(kind: str, value: str) -> None:
    assert is_placeholder(kind, value)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kind", "value"),
    [
        ("customer_id", "C000123"),
        ("customer_id", "cust-9"),
        ("customer_id", "10"),
        ("customer_id", "nullable-user"),
        ("anonymous_id", "3f2a9c1e-7b4d-4e8a-9f00-1c2d3e4f5a6b"),
        ("visitor_id", "vis-1"),
        ("loyalty_card", "6012345678"),
        ("email", "ana@example.com"),
        ("email", "Ana.Perez@Example.COM"),
        ("email", "info@acme.com"),
        ("email", "user@gmail.com"),
        ("email", "testing@example.com"),
    ],
)
def test_real_values_are_not_placeholders(kind: str, value: str) -> None:
    assert not is_placeholder(kind, value)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- key rules


def test_component_key_rule() -> None:
    a, b = ident("email", "ana@example.com"), ident("anonymous_id", "a-1")
    members = [member(a), member(b)]
    expected = "anon-" + min(hmac_hex("email", "ana@example.com"), hmac_hex("anonymous_id", "a-1"))
    assert component_key(members, None) == expected[:37]
    assert len(component_key(members, None)) == len("anon-") + 32
    assert component_key(members, "C1") == "C1"


def test_provisional_and_solo_keys() -> None:
    a, b = ident("visitor_id", "v-1"), ident("email", "bo@example.org")
    assert provisional_key([a, b]) == anon(a, b)
    assert provisional_key([a, b, cid("C7")]) == "C7"
    assert provisional_key([]) is None
    solo = solo_key("web:e-1", PII_KEY)
    assert solo == "anon-" + hmac_hex("event", "web:e-1")[:32]
    assert solo != solo_key("web:e-2", PII_KEY)
    assert solo != solo_key("web:e-1", b"another-key-0123456789")


# ------------------------------------------------------------------------ IdentityGraph


def test_link_single_event_and_relink_is_stable() -> None:
    store: dict[str, Any] = {}
    graph = IdentityGraph(store)
    a, e = ident("anonymous_id", "a-1"), ident("email", "ana@example.com")
    first = graph.link([a, e], "web:1")
    assert first.key == anon(a, e)
    assert (first.merges, first.refused) == ([], 0)
    assert store[member(a)] == store[member(e)] == first.key
    assert store[f"c|{first.key}"] == {
        "members": sorted([member(a), member(e)]),
        "cid": None,
        "aliases": [],
    }
    again = graph.link([e], "support:1")
    assert (again.key, again.merges) == (first.key, [])
    assert graph.surviving(first.key) == first.key
    assert graph.surviving("anon-nobody") is None


class _Writes(dict[str, Any]):
    """A store that records every write and delete (each one a changelog record)."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def __setitem__(self, key: str, value: Any) -> None:
        self.writes.append(key)
        super().__setitem__(key, value)

    def __delitem__(self, key: str) -> None:
        self.writes.append(f"-{key}")
        super().__delitem__(key)


class _Reads(dict[str, Any]):
    """A store that counts the reads of each key (each one a RocksDB get and a decode)."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: Counter[str] = Counter()

    def get(self, key: str, default: Any = None) -> Any:
        self.reads[key] += 1
        return super().get(key, default)

    def __getitem__(self, key: str) -> Any:
        self.reads[key] += 1
        return super().__getitem__(key)

    def __contains__(self, key: object) -> bool:
        self.reads[str(key)] += 1
        return super().__contains__(key)


def test_link_reads_each_key_once() -> None:
    store = _Reads()
    graph = IdentityGraph(store)
    a, v, e = ident("anonymous_id", "a-1"), ident("visitor_id", "v-1"), ident("email", "x@y.io")
    graph.link([a], "web:1")
    graph.link([v, e], "chat:1")
    store.reads.clear()
    graph.link([a, e], "web:2")  # merges the two: every member and component is read
    assert store.reads
    assert max(store.reads.values()) == 1, store.reads


def test_link_that_changes_nothing_writes_nothing() -> None:
    store = _Writes()
    graph = IdentityGraph(store)
    a, e = ident("anonymous_id", "a-1"), ident("email", "ana@example.com")
    key = graph.link([a, e], "web:1").key
    store.writes.clear()
    assert graph.link([e], "support:1").key == key
    assert graph.link([a, e], "web:2").key == key
    assert store.writes == []
    c = ident("customer_id", "C9")
    assert graph.link([a, c], "web:3").key == "C9"  # re-keyed: the old component goes
    assert store.writes[:3] == [f"-c|{key}", f"a|{key}", "c|C9"]
    assert sorted(store.writes[3:]) == sorted([member(a), member(e), member(c)])


def test_link_without_identifiers_is_refused() -> None:
    with pytest.raises(ValueError, match="solo_key"):
        IdentityGraph({}).link([], "web:1")


def test_merge_of_two_anonymous_customers() -> None:
    store: dict[str, Any] = {}
    graph = IdentityGraph(store)
    a, v, e = ident("anonymous_id", "a-1"), ident("visitor_id", "v-1"), ident("email", "x@y.io")
    key_a = graph.link([a], "web:1").key
    key_v = graph.link([v, e], "chat:1").key
    assert key_a == anon(a)
    assert key_v == anon(v, e)
    assert key_a != key_v

    bridge = graph.link([a, e], "web:2")
    survivor = anon(a, v, e)
    assert bridge.key == survivor
    assert sorted(bridge.merges) == sorted({key_a, key_v} - {survivor})
    for old in bridge.merges:
        assert store[f"a|{old}"] == {"to": survivor, "by": "web:2"}
        assert graph.surviving(old) == survivor
    assert graph.surviving(key_a) == graph.surviving(key_v) == survivor
    component = store[f"c|{survivor}"]
    assert component["members"] == sorted(member(i) for i in (a, v, e))
    assert component["aliases"] == sorted(bridge.merges)
    assert {store[member(i)] for i in (a, v, e)} == {survivor}
    # Only the survivor is a component now.
    assert [k for k in store if k.startswith("c|")] == [f"c|{survivor}"]
    assert graph.merges_by(survivor, "web:2") == sorted(bridge.merges)
    assert graph.merges_by(survivor, "chat:1") == []
    assert graph.merges_by("anon-unknown", "web:2") == []
    # A replay of the bridging event links nothing new, and finds its merges to re-send
    # from the aliases the link returns.
    replay = graph.link([a, e], "web:2")
    assert (replay.key, replay.merges, replay.aliases) == (survivor, [], sorted(bridge.merges))
    assert graph.merges_by(survivor, "web:2", replay.aliases) == sorted(bridge.merges)


def test_sign_in_rekeys_anonymous_customer_to_customer_id() -> None:
    store: dict[str, Any] = {}
    graph = IdentityGraph(store)
    a, e = ident("anonymous_id", "a-1"), ident("email", "ana@example.com")
    browsing = graph.link([a], "web:1").key
    assert browsing == anon(a)

    sign_in = graph.link([a, cid("C1"), e], "web:2")
    assert sign_in.key == "C1"
    assert sign_in.merges == [browsing]
    assert store[f"a|{browsing}"] == {"to": "C1", "by": "web:2"}
    assert graph.surviving(browsing) == "C1"
    assert store["c|C1"]["cid"] == "C1"
    assert store["c|C1"]["aliases"] == [browsing]
    assert {store[member(i)] for i in (a, e, cid("C1"))} == {"C1"}
    assert graph.merges_by("C1", "web:2") == [browsing]
    # Later events showing only one of the identifiers land on the customer id.
    assert graph.link([e], "support:1").key == "C1"
    assert graph.link([ident("loyalty_card", "L1"), cid("C1")], "store:1").key == "C1"


def test_alias_chain_is_followed() -> None:
    graph = IdentityGraph({})
    a, v, e = ident("anonymous_id", "a-1"), ident("visitor_id", "v-1"), ident("email", "x@y.io")
    k1 = graph.link([a], "web:1").key
    k2 = graph.link([a, v], "web:2").key
    k3 = graph.link([v, e, cid("C9")], "chat:1").key
    assert k3 == "C9"
    for key in {k1, k2}:
        assert graph.surviving(key) == "C9"
    assert set(graph.component("C9")["aliases"]) == {k1, k2} - {"C9"}  # type: ignore[index]


def test_guard_two_customer_ids_never_merge() -> None:
    store: dict[str, Any] = {}
    graph = IdentityGraph(store)
    e1, e2 = ident("email", "ana@example.com"), ident("email", "bo@example.org")
    assert graph.link([cid("C1"), e1], "web:1").key == "C1"
    assert graph.link([cid("C2"), e2], "web:2").key == "C2"

    # A shared-device event shows both e-mails: it must not join C1 and C2.
    shared = graph.link([e1, e2], "chat:1")
    assert shared.refused == 1
    assert shared.merges == []
    assert shared.key in {"C1", "C2"}
    assert store[member(e1)] == "C1"
    assert store[member(e2)] == "C2"
    assert store["c|C1"]["members"] == sorted([member(cid("C1")), member(e1)])
    assert store["c|C2"]["members"] == sorted([member(cid("C2")), member(e2)])
    assert not any(k.startswith("a|") for k in store)

    # An event of C2 showing C1's e-mail: the event is C2's, the e-mail stays C1's.
    stolen = graph.link([cid("C2"), e1], "support:1")
    assert (stolen.key, stolen.refused, stolen.merges) == ("C2", 1, [])
    assert store[member(e1)] == "C1"
    assert store["c|C1"]["members"] == sorted([member(cid("C1")), member(e1)])
    assert store["c|C2"]["members"] == sorted([member(cid("C2")), member(e2)])
    assert graph.surviving("C1") == "C1"
    assert graph.surviving("C2") == "C2"


def test_guard_anonymous_joins_the_agreeing_customer_only() -> None:
    store: dict[str, Any] = {}
    graph = IdentityGraph(store)
    e1, e2, v = ident("email", "a@x.io"), ident("email", "b@x.io"), ident("visitor_id", "v")
    graph.link([cid("C1"), e1], "web:1")
    graph.link([cid("C2"), e2], "web:2")
    anonymous = graph.link([v], "chat:1").key
    # The visitor shows up with both e-mails: it joins one of them, the other is refused.
    result = graph.link([v, e1, e2], "chat:2")
    assert result.refused == 1
    assert result.key in {"C1", "C2"}
    other = ({"C1", "C2"} - {result.key}).pop()
    assert store[member(v)] == result.key
    assert graph.surviving(anonymous) == result.key
    assert store[member(e1)] == "C1"
    assert store[member(e2)] == "C2"
    assert member(v) not in store[f"c|{other}"]["members"]


def test_forget() -> None:
    store: dict[str, Any] = {}
    graph = IdentityGraph(store)
    a, e = ident("anonymous_id", "a-1"), ident("email", "ana@example.com")
    bo = ident("email", "bo@example.org")
    old = graph.link([a], "web:1").key
    graph.link([a, e, cid("C1")], "web:2")
    graph.link([bo], "support:1")
    bo_key = anon(bo)

    assert graph.forget("anon-unknown") is None
    forgotten = graph.forget(old)  # an alias is answered as its surviving customer
    assert forgotten is not None
    assert forgotten.key == "C1"
    assert forgotten.aliases == [old]
    assert forgotten.identifiers == 3
    for identifier in (a, e, cid("C1")):
        assert member(identifier) not in store
    assert "c|C1" not in store
    assert f"a|{old}" not in store
    assert graph.surviving("C1") is None
    assert graph.surviving(old) is None
    assert graph.forget("C1") is None
    # Someone else is untouched.
    assert store == {member(bo): bo_key, f"c|{bo_key}": store[f"c|{bo_key}"]}
    assert store[f"c|{bo_key}"]["members"] == [member(bo)]
    # Coming back after being forgotten starts from scratch.
    assert graph.link([a], "web:3").key == anon(a)


# ----------------------------------------------------------------- independent reference


def reference(events: Iterable[Sequence[Identifier]]) -> dict[str, str]:
    """member -> final customer key, by a plain union-find and the key rule of section 5."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for identifiers in events:
        names = [member(i) for i in identifiers]
        for name in names:
            parent.setdefault(name, name)
        for name in names[1:]:
            parent[find(name)] = find(names[0])
    groups: dict[str, list[str]] = {}
    for name in parent:
        groups.setdefault(find(name), []).append(name)
    result: dict[str, str] = {}
    for names in groups.values():
        cids = {n.split("|", 2)[2] for n in names if n.startswith("i|customer_id|")}
        assert len(cids) <= 1, "reference is only for inputs without customer_id conflicts"
        key = cids.pop() if cids else "anon-" + min(n.split("|", 2)[2] for n in names)[:32]
        for name in names:
            result[name] = key
    return result


def run_and_check(events: Sequence[tuple[str, Sequence[Identifier]]]) -> None:
    """Link the events in order through a fresh graph and compare with the reference."""
    store: dict[str, Any] = {}
    graph = IdentityGraph(store)
    returned: list[tuple[str, str]] = []
    for event_id, identifiers in events:
        resolution = graph.link(identifiers, event_id)
        # What the identity stage reads a replay's merges from, instead of the component
        assert resolution.aliases == store[f"c|{resolution.key}"]["aliases"]
        returned.append((event_id, resolution.key))
    expected = reference(identifiers for _, identifiers in events)

    # The partition and the keys.
    actual = {k: v for k, v in store.items() if k.startswith("i|")}
    assert actual == expected
    components = {k[2:]: v for k, v in store.items() if k.startswith("c|")}
    assert set(components) == set(expected.values())
    for key, component in components.items():
        assert component["members"] == sorted(m for m, k in expected.items() if k == key)
    # Every event's identifiers end on one key, and the key it was given then still leads
    # there (through aliases); every such older key is an alias of the survivor.
    ids_of = dict(events)
    seen_keys: dict[str, set[str]] = {}
    for event_id, key in returned:
        final = {expected[member(i)] for i in ids_of[event_id]}
        assert len(final) == 1
        (survivor,) = final
        assert graph.surviving(key) == survivor
        seen_keys.setdefault(survivor, set()).add(key)
    for survivor, keys in seen_keys.items():
        assert set(components[survivor]["aliases"]) == keys - {survivor}
    aliases = {k[2:] for k in store if k.startswith("a|")}
    assert aliases == {a for c in components.values() for a in c["aliases"]}


# One journey over four channels: an anonymous visitor who signs in, chats, writes to support
# and shops with a loyalty card, plus a second person who never shows a customer id.
A1, A2 = ident("anonymous_id", "ana-browser"), ident("anonymous_id", "ana-phone")
ANA, V1 = ident("email", "ana@example.com"), ident("visitor_id", "ana-visitor")
L1, C1 = ident("loyalty_card", "6012345678"), cid("C000123")
BO, V2, A3 = (
    ident("email", "bo@example.org"),
    ident("visitor_id", "bo-vis"),
    ident("anonymous_id", "bo-browser"),
)
JOURNEY: list[tuple[str, tuple[Identifier, ...]]] = [
    ("web:1", (A1,)),  # anonymous browsing
    ("web:2", (A1,)),
    ("web:3", (A1, C1, ANA)),  # sign_in
    ("web:4", (A2,)),  # browsing on another device
    ("web:5", (A2, ANA)),  # form with the e-mail
    ("chat:1", (V1, ANA)),
    ("chat:2", (V1,)),
    ("support:1", (ANA,)),
    ("store:1", (L1, C1)),
    ("store:2", (L1,)),
    ("web:6", (A3,)),  # the second person
    ("chat:3", (V2, BO)),
    ("support:2", (BO,)),
    ("web:7", (A3, BO)),
]


def test_journey_reference_sanity() -> None:
    """The reference itself: two people, Ana under her customer id."""
    expected = reference(ids for _, ids in JOURNEY)
    assert {expected[member(i)] for i in (A1, A2, ANA, V1, L1, C1)} == {"C000123"}
    assert {expected[member(i)] for i in (A3, BO, V2)} == {anon(A3, BO, V2)}


def test_journey_in_arrival_order() -> None:
    run_and_check(JOURNEY)


@FAST
@given(st.permutations(JOURNEY))
def test_journey_any_order(events: list[tuple[str, tuple[Identifier, ...]]]) -> None:
    run_and_check(events)


POOL = [
    ident(kind, f"{kind}-{n}")
    for kind in ("anonymous_id", "visitor_id", "email", "loyalty_card")
    for n in range(3)
]


@st.composite
def random_graphs(draw: st.DrawFn) -> list[tuple[str, tuple[Identifier, ...]]]:
    """Random events over a small identifier pool, some carrying their component's
    customer_id (never two different ones in one component), in a random order."""
    sets = draw(
        st.lists(
            st.lists(st.sampled_from(POOL), min_size=1, max_size=3, unique=True),
            min_size=1,
            max_size=12,
        )
    )
    components = reference(sets)
    with_cid = draw(st.lists(st.booleans(), min_size=len(sets), max_size=len(sets)))
    events: list[tuple[str, tuple[Identifier, ...]]] = []
    for n, (ids, give_cid) in enumerate(zip(sets, with_cid, strict=True)):
        extra: list[Identifier] = []
        if give_cid:
            # The customer id of a component: derived from its anonymous key.
            extra = [cid("C-" + components[member(ids[0])][5:13])]
        events.append((f"web:{n}", (*ids, *extra)))
    return draw(st.permutations(events))


@FAST
@given(random_graphs())
def test_random_graphs_any_order(events: list[tuple[str, tuple[Identifier, ...]]]) -> None:
    run_and_check(events)


def test_link_heals_a_pointer_left_dangling_by_a_crash() -> None:
    """Each key is its own changelog record, so a crash can keep an identifier's pointer and
    lose its component: linking again must rebuild it, never fail."""
    store: dict[str, Any] = {}
    graph = IdentityGraph(store)
    email = Identifier(kind="email", value="e" * 64)
    visitor = Identifier(kind="visitor_id", value="f" * 64)
    first = graph.link([email, visitor], "chat:1").key
    del store[f"c|{first}"]
    again = graph.link([email, visitor], "chat:1")
    assert again.key == first
    assert store[f"c|{first}"]["members"] == sorted(
        [f"i|email|{'e' * 64}", f"i|visitor_id|{'f' * 64}"]
    )
