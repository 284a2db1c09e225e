"""Sentiment of free text with VADER, whose lexicon ships inside its wheel (no download)."""

from __future__ import annotations

from functools import lru_cache

from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer


@lru_cache(maxsize=1)
def _analyzer() -> SentimentIntensityAnalyzer:
    return SentimentIntensityAnalyzer()


def sentiment(text: str) -> float:
    """Text -> VADER compound score in [-1, 1], rounded to 4 decimals."""
    compound = float(_analyzer().polarity_scores(text)["compound"])
    return round(max(-1.0, min(1.0, compound)), 4)
