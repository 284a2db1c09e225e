"""`cx.raw.support`: a help-desk ticket stream's event."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from service.canonical import Channel
from service.raw._common import Email, HelpdeskTime, Id, RawModel, Text


class SupportRequester(RawModel):
    email: Email
    customer_id: Id | None = None


class SupportSurvey(RawModel):
    csat: int | None = Field(default=None, ge=1, le=5)
    ces: int | None = Field(default=None, ge=1, le=7)

    @model_validator(mode="after")
    def _some_answer(self) -> SupportSurvey:
        if self.csat is None and self.ces is None:
            raise ValueError("survey: at least one of csat, ces must be non-null")
        return self


class SupportEvent(RawModel):
    channel: ClassVar[Channel] = "support"
    time_field: ClassVar[str] = "occurred_at"

    event_id: Id
    ticket_id: Id
    action: Literal["created", "agent_reply", "customer_reply", "solved", "reopened", "survey"]
    occurred_at: HelpdeskTime
    requester: SupportRequester
    comment: Text | None = None
    survey: SupportSurvey | None = None

    @model_validator(mode="after")
    def _survey_when_survey(self) -> SupportEvent:
        if self.action == "survey" and self.survey is None:
            raise ValueError("survey: required when action is survey")
        return self

    @property
    def source_id(self) -> str:
        return self.event_id
