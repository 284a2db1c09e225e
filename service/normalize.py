"""Normalize: a validated raw event + where it was read -> the canonical touchpoint."""

from __future__ import annotations

from service.canonical import Kind, Normalized, Ratings, Source, Touchpoint, to_utc_millis
from service.identity import identifiers_of, provisional_key, solo_key
from service.pii import redact
from service.raw import ChatEvent, RawEvent, StoreEvent, SupportEvent, WebEvent
from service.sentiment import sentiment

_CHAT_KINDS: dict[str, Kind] = {
    "conversation_started": "conversation_started",
    "message": "message",
    "handoff": "handoff",
    "conversation_closed": "conversation_closed",
    "rating": "survey_response",
}
_SUPPORT_KINDS: dict[str, Kind] = {
    "created": "ticket_created",
    "agent_reply": "agent_reply",
    "customer_reply": "customer_reply",
    "solved": "ticket_solved",
    "reopened": "ticket_reopened",
    "survey": "survey_response",
}
_STORE_KINDS: dict[str, Kind] = {
    "purchase": "purchase",
    "return": "return",
    "kiosk_survey": "survey_response",
}
_NO_RATINGS = Ratings(nps=None, csat=None, ces=None)


def _specifics(
    event: RawEvent,
) -> tuple[Kind, str | None, Ratings, str | None, str | None, str | None]:
    """Raw event -> (kind, thread id, ratings, free text, amount, currency)."""
    match event:
        case WebEvent():
            web_survey = event.survey
            ratings, text = _NO_RATINGS, None
            if web_survey is not None:
                score, on = web_survey.score, web_survey.kind
                ratings = Ratings(
                    nps=score if on == "nps" else None,
                    csat=score if on == "csat" else None,
                    ces=score if on == "ces" else None,
                )
                text = web_survey.comment
            return event.type, event.session_id, ratings, text, None, None
        case ChatEvent():
            ratings = Ratings(nps=None, csat=event.rating, ces=None)
            kind = _CHAT_KINDS[event.event]
            return kind, event.conversation_id, ratings, event.text, None, None
        case SupportEvent():
            survey = event.survey
            ratings = (
                _NO_RATINGS
                if survey is None
                else Ratings(nps=None, csat=survey.csat, ces=survey.ces)
            )
            kind = _SUPPORT_KINDS[event.action]
            return kind, event.ticket_id, ratings, event.comment, None, None
        case StoreEvent():
            ratings = Ratings(nps=event.nps, csat=event.csat, ces=None)
            kind = _STORE_KINDS[event.kind]
            return kind, event.txn_id, ratings, None, event.amount, event.currency


def normalize(event: RawEvent, source: Source, pii_key: bytes) -> Normalized:
    """Raw event + source coordinates + HMAC key -> touchpoint and identifiers."""
    kind, thread_id, ratings, text, amount, currency = _specifics(event)
    identifiers, placeholders = identifiers_of(event, pii_key)
    event_id = f"{event.channel}:{event.source_id}"
    clean_text = redact(text) if text else None
    touchpoint = Touchpoint(
        event_id=event_id,
        channel=event.channel,
        kind=kind,
        occurred_at=to_utc_millis(event.occurred_at),
        customer_key=provisional_key(identifiers) or solo_key(event_id, pii_key),
        thread_id=thread_id,
        ratings=ratings,
        text=clean_text,
        sentiment=sentiment(clean_text) if clean_text else None,
        amount=amount,
        currency=currency,
        source=source,
    )
    return Normalized(touchpoint=touchpoint, identifiers=identifiers, placeholders=placeholders)
