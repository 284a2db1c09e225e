"""Faust's partition assignor, with the single-partition stages spread over the workers.

Faust assigns topics in co-partitioned groups: every topic with the same number of partitions
(that the same members subscribe to) is one group, and a group's partition N goes to one
member. The identity stage and the metrics merger each read a topic of one partition and
keep a table of one partition, so all four topics were one group: both stages ran on the
same worker. With two workers that one did its half of the partitioned stages and both
single-partition stages: in a 20 000-message run, 14 s of CPU against 9 s for the other.

`SpreadAssignor` assigns each declared family (a stage's input topic with its table's
changelog, which must stay together) as a group of its own, and gives each family the
member holding the fewest of them (keeping its current member while that one holds no more
than its share). Everything else is assigned as Faust does.
"""

from __future__ import annotations

import hashlib
import inspect
import weakref
from collections import Counter
from collections.abc import Iterable, MutableMapping
from math import ceil
from typing import Any, cast

from aiokafka.cluster import ClusterMetadata
from faust.assignor.client_assignment import ClientAssignment, CopartitionedAssignment
from faust.assignor.cluster_assignment import ClusterAssignment
from faust.assignor.copartitioned_assignor import CopartitionedAssignor
from faust.assignor.partition_assignor import PartitionAssignor

# Faust's `PartitionAssignor._perform_assignment`, which `_perform_assignment` below copies
# (faust-streaming 0.15.3): a Faust that changes it fails tests/unit/test_assignor.py until
# the copy is checked again.
FAUST_PERFORM_SHA256 = "1e0bf2c5c8f42574670a8ef7661a043919c8e03b59ec966ce8109a36fd20fa52"

# app -> families: sets of single-partition topics that must go to one member together
_FAMILIES: weakref.WeakKeyDictionary[Any, list[frozenset[str]]] = weakref.WeakKeyDictionary()


def faust_perform_digest() -> str:
    """-> the SHA-256 of the source of Faust's own `_perform_assignment`."""
    return hashlib.sha256(
        inspect.getsource(PartitionAssignor._perform_assignment).encode()
    ).hexdigest()


def spread(app: Any, families: Iterable[Iterable[str]]) -> None:
    """Declare `app`'s single-partition families (each: a stage's input topic and its
    table's changelog), to be spread over the members by `SpreadAssignor`."""
    _FAMILIES[app] = [frozenset(family) for family in families]


def split_families(
    topic_sets: Iterable[set[str]], families: list[frozenset[str]]
) -> tuple[list[set[str]], list[set[str]]]:
    """Co-partitioned topic sets of one partition -> (the declared families found in them,
    each a set of its own; the rest of each set, as Faust had it)."""
    found: list[set[str]] = []
    rest: list[set[str]] = []
    for topics in topic_sets:
        left = set(topics)
        for family in families:
            if family <= left:
                found.append(set(family))
                left -= family
        if left:
            rest.append(left)
    return found, rest


def place(
    members: MutableMapping[str, CopartitionedAssignment], held: Counter[str], quota: int
) -> MutableMapping[str, CopartitionedAssignment]:
    """The members' assignments of one single-partition family -> the same, its partition
    taken from a member already holding `quota` families or more, ordered so that Faust's
    assignor gives it to the member holding the fewest (the first of equals)."""
    for member, assignment in members.items():
        if assignment.partition_assigned(0, active=True) and held[member] >= quota:
            assignment.unassign_partition(0, active=True)
    return dict(sorted(members.items(), key=lambda item: held[item[0]]))


class SpreadAssignor(PartitionAssignor):
    """Faust's assignor; the families declared with `spread` go to different members."""

    def _perform_assignment(self, cluster: ClusterMetadata, member_metadata: Any) -> Any:
        cluster_assgn = ClusterAssignment()

        clients_metadata = {
            member_id: self._get_client_metadata(metadata)
            for member_id, metadata in member_metadata.items()
        }

        subscriptions = {
            member_id: cast(list[str], metadata.subscription)
            for member_id, metadata in member_metadata.items()
        }

        for member_id in member_metadata:
            cluster_assgn.add_client(
                member_id, subscriptions[member_id], clients_metadata[member_id]
            )
        topics = cluster_assgn.topics()

        copartitioned_groups = self._get_copartitioned_groups(topics, cluster, subscriptions)

        self._update_member_urls(clients_metadata)

        # Initialize fresh assignment
        assignments: MutableMapping[str, ClientAssignment] = {
            member_id: ClientAssignment(actives={}, standbys={}) for member_id in member_metadata
        }

        topic_to_group_id = {}
        partitions_by_topic = {}

        # (this and the lines marked "spread" are not Faust's)
        families, rest = split_families(
            copartitioned_groups.get(1, ()), _FAMILIES.get(self.app, [])
        )
        if families:  # spread
            copartitioned_groups[1] = families + rest
        quota = ceil(len(families) / max(1, len(member_metadata)))  # spread
        held: Counter[str] = Counter()  # spread: member -> families it holds

        for group_id, (num_partitions, topic_groups) in enumerate(
            sorted(copartitioned_groups.items())
        ):
            for topics in topic_groups:
                for topic in topics:
                    topic_to_group_id[topic] = group_id
                    partitions_by_topic[topic] = num_partitions
                assert len(topics) > 0 and num_partitions > 0  # noqa: S101, PT018 - Faust's
                # Get assignment for unique copartitioned group
                assgn = cluster_assgn.copartitioned_assignments(topics)
                family = num_partitions == 1 and topics in families  # spread
                if family:  # spread
                    assgn = place(assgn, held, quota)
                assignor = CopartitionedAssignor(
                    topics=topics,
                    cluster_asgn=assgn,
                    num_partitions=num_partitions,
                    replicas=self.replicas,
                )
                # Update client assignments for copartitioned group
                for client, copart_assn in assignor.get_assignment().items():
                    assignments[client].add_copartitioned_assignment(copart_assn)
                    if family and copart_assn.partition_assigned(0, active=True):  # spread
                        held[client] += 1

        # Add all changelogs of global tables as standby for all members
        assignments = self._global_table_standby_assignments(assignments, partitions_by_topic)

        changelog_distribution = self._get_changelog_distribution(assignments)
        external_topic_distribution = self._get_external_topic_distribution(assignments)
        res = self._protocol_assignments(
            assignments,
            changelog_distribution,
            external_topic_distribution,
            topic_to_group_id,
        )
        return res
