"""Structured logs: one JSON object per line, with context, and the text format for people."""

from __future__ import annotations

import io
import logging
import logging.config

import orjson
import pytest

from service.logs import JsonFormatter, logging_config

pytestmark = pytest.mark.unit


def _capture(fmt: str) -> tuple[logging.Logger, io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    formatter = logging.config.dictConfigClass(logging_config("INFO", fmt)).configure_formatter(
        logging_config("INFO", fmt)["formatters"]["main"]
    )
    handler.setFormatter(formatter)
    logger = logging.getLogger(f"cxpulse.test.{fmt}")
    logger.handlers = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    return logger, stream


def test_json_line_with_level_logger_message_and_context() -> None:
    logger, stream = _capture("json")
    logger.warning("refused %d merges", 2, extra={"event_id": "web:e-1", "refused": 2})
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    entry = orjson.loads(lines[0])
    assert entry["level"] == "WARNING"
    assert entry["logger"] == "cxpulse.test.json"
    assert entry["message"] == "refused 2 merges"
    assert entry["context"] == {"event_id": "web:e-1", "refused": 2}
    assert entry["ts"].endswith("+00:00")


def test_exception_stays_on_one_line() -> None:
    logger, stream = _capture("json")
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        logger.exception("failed")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    entry = orjson.loads(lines[0])
    assert "ValueError: boom" in entry["exception"]
    assert "context" not in entry


def test_text_format_for_people() -> None:
    logger, stream = _capture("text")
    logger.info("hello")
    line = stream.getvalue().strip()
    assert line.endswith("INFO cxpulse.test.text hello")
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(line)


def test_unserializable_context_does_not_break_logging() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "m", None, None)
    record.thing = object()
    entry = orjson.loads(JsonFormatter().format(record))
    assert entry["context"]["thing"].startswith("<object object")
