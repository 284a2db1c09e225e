"""`cx.raw.store`: a point-of-sale or in-store kiosk event."""

from __future__ import annotations

from datetime import datetime
from typing import ClassVar, Literal

from pydantic import Field, model_validator

from service.canonical import Channel
from service.raw._common import EpochSeconds, Id, RawModel

AMOUNT_PATTERN = r"^[0-9]{1,15}(\.[0-9]{1,6})?$"


class StoreEvent(RawModel):
    channel: ClassVar[Channel] = "store"
    time_field: ClassVar[str] = "time"

    txn_id: Id
    store_id: Id
    kind: Literal["purchase", "return", "kiosk_survey"]
    time: EpochSeconds
    loyalty_card: Id | None = None
    customer_id: Id | None = None
    amount: str | None = Field(default=None, pattern=AMOUNT_PATTERN)
    currency: str | None = Field(default=None, pattern=r"^[A-Z]{3}$")
    nps: int | None = Field(default=None, ge=0, le=10)
    csat: int | None = Field(default=None, ge=1, le=5)

    @model_validator(mode="after")
    def _conditional_fields(self) -> StoreEvent:
        if self.loyalty_card is None and self.customer_id is None:
            raise ValueError("loyalty_card: one of loyalty_card, customer_id must be non-null")
        if self.kind in ("purchase", "return") and self.amount is None:
            raise ValueError(f"amount: required when kind is {self.kind}")
        if self.kind == "kiosk_survey" and self.nps is None and self.csat is None:
            raise ValueError("nps: a kiosk_survey needs at least one of nps, csat")
        return self

    @property
    def source_id(self) -> str:
        return self.txn_id

    @property
    def occurred_at(self) -> datetime:
        return self.time
