"""`cx.raw.chat`: a live-chat platform's webhook event."""

from __future__ import annotations

from datetime import datetime
from typing import ClassVar, Literal

from pydantic import Field, model_validator

from service.canonical import Channel
from service.raw._common import Email, EpochMillis, Id, RawModel, Text


class ChatCustomer(RawModel):
    customer_id: Id | None = None
    email: Email | None = None
    visitor_id: Id | None = None

    @model_validator(mode="after")
    def _someone(self) -> ChatCustomer:
        if self.customer_id is None and self.email is None and self.visitor_id is None:
            raise ValueError("customer: one of customer_id, email, visitor_id must be non-null")
        return self


class ChatEvent(RawModel):
    channel: ClassVar[Channel] = "chat"
    time_field: ClassVar[str] = "timestamp"

    id: Id
    conversation_id: Id
    event: Literal["conversation_started", "message", "handoff", "conversation_closed", "rating"]
    timestamp: EpochMillis
    customer: ChatCustomer
    author: Literal["customer", "agent", "bot"] | None = None
    text: Text | None = None
    rating: int | None = Field(default=None, ge=1, le=5)

    @model_validator(mode="after")
    def _rating_when_rating(self) -> ChatEvent:
        if self.event == "rating" and self.rating is None:
            raise ValueError("rating: required when event is rating")
        return self

    @property
    def source_id(self) -> str:
        return self.id

    @property
    def occurred_at(self) -> datetime:
        return self.timestamp
