"""Raw input models, one module per channel, exactly as upstream systems send them."""

from service.raw.chat import ChatEvent
from service.raw.store import StoreEvent
from service.raw.support import SupportEvent
from service.raw.web import WebEvent

RawEvent = WebEvent | ChatEvent | SupportEvent | StoreEvent

RAW_MODELS: dict[str, type[WebEvent | ChatEvent | SupportEvent | StoreEvent]] = {
    "web": WebEvent,
    "chat": ChatEvent,
    "support": SupportEvent,
    "store": StoreEvent,
}

__all__ = ["RAW_MODELS", "ChatEvent", "RawEvent", "StoreEvent", "SupportEvent", "WebEvent"]
