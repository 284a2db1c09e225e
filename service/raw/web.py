"""`cx.raw.web`: a browser tracker's event."""

from __future__ import annotations

from datetime import datetime
from typing import ClassVar, Literal

from pydantic import Field, model_validator

from service.canonical import Channel
from service.raw._common import Email, Id, RawModel, Rfc3339Time, ShortText, Text, Url

SCORE_RANGES: dict[str, tuple[int, int]] = {"nps": (0, 10), "csat": (1, 5), "ces": (1, 7)}


class WebPage(RawModel):
    url: Url
    title: ShortText | None = None


class WebSurvey(RawModel):
    kind: Literal["nps", "csat", "ces"]
    score: int = Field(ge=0, le=10)
    comment: Text | None = None

    @model_validator(mode="after")
    def _score_on_its_scale(self) -> WebSurvey:
        low, high = SCORE_RANGES[self.kind]
        if not low <= self.score <= high:
            raise ValueError(f"survey.score: a {self.kind} score must be {low}..{high}")
        return self


class WebEvent(RawModel):
    channel: ClassVar[Channel] = "web"
    time_field: ClassVar[str] = "sent_at"

    event_id: Id
    type: Literal["page_view", "sign_in", "form_submit", "survey_response", "account_closed"]
    sent_at: Rfc3339Time
    anonymous_id: Id
    user_id: Id | None = None
    email: Email | None = None
    session_id: Id | None = None
    page: WebPage | None = None
    survey: WebSurvey | None = None

    @model_validator(mode="after")
    def _survey_when_survey_response(self) -> WebEvent:
        if self.type == "survey_response" and self.survey is None:
            raise ValueError("survey: required when type is survey_response")
        return self

    @property
    def source_id(self) -> str:
        return self.event_id

    @property
    def occurred_at(self) -> datetime:
        return self.sent_at
