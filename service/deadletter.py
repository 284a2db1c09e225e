"""Dead letters: a rejection + where the message came from -> the headers of section 7."""

from __future__ import annotations

from datetime import datetime

from pydantic import ConfigDict, Field

from service.canonical import UTC_MILLIS_PATTERN, Canonical, format_utc_millis
from service.parse import Reason, Rejected

HEADER_REASON = "cx.error.reason"
HEADER_DETAIL = "cx.error.detail"
HEADER_TOPIC = "cx.source.topic"
HEADER_PARTITION = "cx.source.partition"
HEADER_OFFSET = "cx.source.offset"
HEADER_FAILED_AT = "cx.failed_at"


class DeadLetterHeaders(Canonical):
    """The headers of a `cx.deadletter` message, as the UTF-8 strings they are sent as."""

    model_config = ConfigDict(strict=True, frozen=True, extra="forbid", populate_by_name=True)

    reason: Reason = Field(alias=HEADER_REASON)
    detail: str = Field(alias=HEADER_DETAIL)
    source_topic: str = Field(alias=HEADER_TOPIC)
    source_partition: str = Field(alias=HEADER_PARTITION, pattern=r"^[0-9]+$")
    source_offset: str = Field(alias=HEADER_OFFSET, pattern=r"^[0-9]+$")
    failed_at: str = Field(alias=HEADER_FAILED_AT, pattern=UTC_MILLIS_PATTERN)


def deadletter_headers(
    rejected: Rejected, topic: str, partition: int, offset: int, failed_at: datetime
) -> list[tuple[str, bytes]]:
    """Rejection + source coordinates + time -> Kafka headers (UTF-8 values)."""
    return [
        (HEADER_REASON, rejected.reason.encode()),
        (HEADER_DETAIL, rejected.detail.encode("utf-8", "replace")),
        (HEADER_TOPIC, topic.encode()),
        (HEADER_PARTITION, str(partition).encode()),
        (HEADER_OFFSET, str(offset).encode()),
        (HEADER_FAILED_AT, format_utc_millis(failed_at).encode()),
    ]


def read_headers(
    headers: list[tuple[str, bytes]] | tuple[tuple[str, bytes], ...],
) -> dict[str, str]:
    """Kafka headers -> {name: UTF-8 text}, later duplicates winning."""
    return {name: value.decode("utf-8", "replace") for name, value in headers}
