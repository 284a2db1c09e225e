"""A TCP proxy the test controls, on loopback, to simulate broker faults."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from aiokafka.protocol import produce

from service.broker import EmbeddedBroker, free_port, start_broker

_PRODUCE, _METADATA = 0, 3  # Kafka API keys
_TOPIC_AUTHORIZATION_FAILED = 29
_EOF = b""

Queue = asyncio.Queue[tuple[float, bytes]]  # (when it is due, a whole Kafka frame)


@dataclass(eq=False)
class _Link:
    """One client connection and its upstream connection to the broker."""

    client: asyncio.StreamWriter
    spared: bool = False
    upstream: asyncio.StreamWriter | None = None
    to_broker: Queue = field(default_factory=asyncio.Queue)
    to_client: Queue = field(default_factory=asyncio.Queue)
    # One entry per request awaiting its response, in order: None when the broker answers,
    # partitions the proxy denied to add to the broker's answer, or the proxy's own answer
    # (sent once every earlier response has been).
    pending: deque[bytes | _Denied | None] = field(default_factory=deque)

    def writers(self) -> list[asyncio.StreamWriter]:
        return [w for w in (self.client, self.upstream) if w is not None]


class TcpProxy:
    """Forwards 127.0.0.1:`port` to the Kafka broker at 127.0.0.1:`target`, with faults the
    test switches on:

    - `cut()`: every connection is closed (FIN) and new ones are refused;
    - `reset()`: every connection is reset (RST), and so is every new one;
    - `black_hole()`: connections stay open but no byte flows either way; new ones are
      accepted and left silent (they flow once restored);
    - `latency(seconds)`: every request and response waits `seconds` more (in order,
      without limiting throughput);
    - `refuse_produce(topic)`: writes to `topic` fail with TOPIC_AUTHORIZATION_FAILED, as on
      a broker whose ACLs deny them; the rest of each Produce request reaches the broker.

    `restore()` ends any of them. Connections whose Kafka client id starts with one of
    `spare` are never touched: the test's own clients, as on another path to the broker.
    With `auto_create=False`, Metadata requests (v4-v8) are rewritten to not create missing
    topics, as a cluster with `auto.create.topics.enable=false` (Tansu has no such setting)."""

    def __init__(self, target: int, spare: tuple[str, ...] = (), auto_create: bool = True) -> None:
        self.target = target
        self.port = free_port()
        self.spare = spare
        self.auto_create = auto_create
        self._mode: Literal["open", "cut", "reset", "black_hole"] = "open"
        self._delay = 0.0
        self._refused: str | None = None
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._links: set[_Link] = set()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._server: asyncio.AbstractServer | None = None

    def __enter__(self) -> TcpProxy:
        self._thread.start()
        self._ready.wait(5)
        return self

    def __exit__(self, *_: object) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()
            tasks = asyncio.all_tasks() - {asyncio.current_task()}
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for link in list(self._links):
                for writer in link.writers():
                    writer.close()

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(close(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._serve, "127.0.0.1", self.port)
        )
        self._ready.set()
        self._loop.run_forever()

    def _apply(self, change: Callable[[], None]) -> None:
        """Run `change` on the proxy's loop and return once it is in effect."""

        async def run() -> None:
            change()

        asyncio.run_coroutine_threadsafe(run(), self._loop).result(5)

    def _faulty(self) -> list[_Link]:
        return [link for link in self._links if not link.spared]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        link = _Link(writer)
        self._links.add(link)
        try:
            # The client speaks first in Kafka: its first request names it.
            first = await _read_frame(reader)
            if not first:
                return
            link.spared = bool(self.spare) and _client_id(first).startswith(self.spare)
            if not link.spared:
                if self._mode == "cut":
                    return
                if self._mode == "reset":
                    _abort(writer)
                    return
                await self._flowing.wait()  # a black hole: accepted, and silent
                if writer.is_closing():
                    return
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
            link.upstream = up_writer
            await asyncio.gather(
                self._pump(link, _frames(reader, first), link.to_broker, self._on_request),
                self._deliver(link, link.to_broker, up_writer),
                self._pump(link, _frames(up_reader, _EOF), link.to_client, self._on_response),
                self._deliver(link, link.to_client, writer),
            )
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self._links.discard(link)
            for w in link.writers():
                w.close()

    def _due(self, link: _Link) -> float:
        return self._loop.time() + (0.0 if link.spared else self._delay)

    def _on_request(self, link: _Link, frame: bytes) -> None:
        if link.spared:
            link.to_broker.put_nowait((self._due(link), frame))
            return
        if not self.auto_create:
            frame = _no_auto_create(frame)
        denied, forwarded = _deny(frame, self._refused) if self._refused else (None, frame)
        if forwarded is None:  # nothing left for the broker: the proxy answers
            assert denied is not None
            if _expects_response(frame):
                link.pending.append(denied.answer())
                self._release(link)
            return
        if _expects_response(forwarded):
            link.pending.append(denied)
        link.to_broker.put_nowait((self._due(link), forwarded))

    def _on_response(self, link: _Link, frame: bytes) -> None:
        if link.pending and not link.spared:
            entry = link.pending.popleft()
            if isinstance(entry, _Denied):
                frame = entry.merge(frame)
        link.to_client.put_nowait((self._due(link), frame))
        self._release(link)

    def _release(self, link: _Link) -> None:
        """Send the proxy's own answers that are next in line."""
        while link.pending and isinstance(link.pending[0], bytes):
            answer = link.pending.popleft()
            assert isinstance(answer, bytes)
            link.to_client.put_nowait((self._due(link), answer))

    async def _pump(
        self,
        link: _Link,
        frames: AsyncIterator[bytes],
        queue: Queue,
        on_frame: Callable[[_Link, bytes], None],
    ) -> None:
        """Read frames into `queue` (through `on_frame`), then the end of stream."""
        with contextlib.suppress(OSError, asyncio.IncompleteReadError, struct.error, ValueError):
            async for frame in frames:
                on_frame(link, frame)
        queue.put_nowait((0.0, _EOF))

    async def _deliver(self, link: _Link, queue: Queue, writer: asyncio.StreamWriter) -> None:
        """Write each frame once due and while the fault lets bytes flow."""
        with contextlib.suppress(OSError):
            while True:
                due, data = await queue.get()
                if data == _EOF:
                    break
                await asyncio.sleep(max(0.0, due - self._loop.time()))
                if not link.spared:
                    await self._flowing.wait()
                if writer.is_closing():
                    break
                writer.write(data)
                await writer.drain()
        writer.close()

    def cut(self) -> None:
        def close_all() -> None:
            self._mode = "cut"
            self._flowing.set()  # waiting connections wake up, and find themselves closed
            for link in self._faulty():
                for writer in link.writers():
                    writer.close()

        self._apply(close_all)

    def reset(self) -> None:
        def reset_all() -> None:
            self._mode = "reset"
            self._flowing.set()
            for link in self._faulty():
                for writer in link.writers():
                    _abort(writer)

        self._apply(reset_all)

    def black_hole(self) -> None:
        def hold() -> None:
            self._mode = "black_hole"
            self._flowing.clear()

        self._apply(hold)

    def latency(self, seconds: float) -> None:
        def delay() -> None:
            self._delay = seconds

        self._apply(delay)

    def refuse_produce(self, topic: str) -> None:
        def refuse() -> None:
            self._refused = topic

        self._apply(refuse)

    def restore(self) -> None:
        def reopen() -> None:
            self._mode = "open"
            self._delay = 0.0
            self._refused = None
            self._flowing.set()

        self._apply(reopen)


async def _frames(reader: asyncio.StreamReader, first: bytes) -> AsyncIterator[bytes]:
    """Whole size-prefixed Kafka frames, until the peer closes."""
    if first:
        yield first
    while frame := await _read_frame(reader):
        yield frame


async def _read_frame(reader: asyncio.StreamReader) -> bytes:
    """One size-prefixed Kafka frame, or b"" at end of stream."""
    try:
        head = await reader.readexactly(4)
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise
        return _EOF
    return head + await reader.readexactly(int.from_bytes(head, "big"))


def _header(frame: bytes) -> tuple[int, int, int, int]:
    """A request's api key, version, correlation id, and where its body starts (header v1:
    the client id is a nullable string; the tagged fields of header v2 are not handled)."""
    api_key, version, correlation, length = struct.unpack_from(">hhih", frame, 4)
    return api_key, version, correlation, 14 + max(0, length)


def _client_id(frame: bytes) -> str:
    (length,) = struct.unpack_from(">h", frame, 12)
    return "" if length < 0 else frame[14 : 14 + length].decode(errors="replace")


def _expects_response(frame: bytes) -> bool:
    """False only for a Produce request with acks=0 (v3+ start with a transactional id)."""
    api_key, version, _, body = _header(frame)
    if api_key != _PRODUCE:
        return True
    if version >= 3:
        (length,) = struct.unpack_from(">h", frame, body)
        body += 2 + max(0, length)
    (acks,) = struct.unpack_from(">h", frame, body)
    return bool(acks)


def _no_auto_create(frame: bytes) -> bytes:
    """A Metadata request v4-v8 with allow_auto_topic_creation cleared (the last field up to
    v7; v8 adds two flags after it). Older versions have no flag; aiokafka sends v5."""
    api_key, version, _, _ = _header(frame)
    if api_key != _METADATA or not 4 <= version <= 8:
        return frame
    at = len(frame) - (1 if version < 8 else 3)
    return frame[:at] + b"\x00" + frame[at + 1 :]


@dataclass(frozen=True)
class _Denied:
    """The partitions of one Produce request the proxy refuses."""

    version: int
    correlation: int
    topics: list[tuple[str, list[int]]]

    def _errors(self) -> list[tuple[str, list[tuple[object, ...]]]]:
        # Per partition: partition, error, offset, then timestamp (v2+), log start offset
        # (v5+), record errors and an error message (v8).
        tail: tuple[object, ...] = ((), (-1,), (-1, -1), (-1, -1, [], None))[
            (self.version >= 2) + (self.version >= 5) + (self.version >= 8)
        ]
        return [
            (topic, [(p, _TOPIC_AUTHORIZATION_FAILED, -1, *tail) for p in partitions])
            for topic, partitions in self.topics
        ]

    def _frame(self, topics: list[Any], throttle: int) -> bytes:
        response = getattr(produce, f"ProduceResponse_v{self.version}")
        fields = (topics,) if self.version == 0 else (topics, throttle)
        payload: bytes = self.correlation.to_bytes(4, "big") + response(*fields).encode()
        return len(payload).to_bytes(4, "big") + payload

    def answer(self) -> bytes:
        """The whole response, when every partition of the request was refused."""
        return self._frame(self._errors(), 0)

    def merge(self, frame: bytes) -> bytes:
        """The broker's response to the rest of the request, with the refused partitions."""
        response = getattr(produce, f"ProduceResponse_v{self.version}").decode(frame[8:])
        throttle = 0 if self.version == 0 else response.throttle_time_ms
        return self._frame([*response.topics, *self._errors()], throttle)


def _deny(frame: bytes, topic: str) -> tuple[_Denied | None, bytes | None]:
    """A request -> the partitions refused (writes to `topic`) and what to forward (None when
    nothing is left)."""
    api_key, version, correlation, body = _header(frame)
    if api_key != _PRODUCE or topic.encode() not in frame:
        return None, frame
    request_type = getattr(produce, f"ProduceRequest_v{version}")
    request: Any = request_type.decode(frame[body:])
    kept = [(name, parts) for name, parts in request.topics if name != topic]
    if len(kept) == len(request.topics):
        return None, frame
    refused = [(name, [p for p, _ in parts]) for name, parts in request.topics if name == topic]
    denied = _Denied(version, correlation, refused)
    if not kept:
        return denied, None
    fields = {name: getattr(request, name) for name in request_type.SCHEMA.names}
    rest = frame[4:body] + request_type(**{**fields, "topics": kept}).encode()
    return denied, len(rest).to_bytes(4, "big") + rest


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP reset (RST), not an orderly FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


# aiokafka's default client id ("aiokafka-<version>"): the tests' own publishers and readers.
# The worker's clients are Faust's ("faust-<version>"), so only they suffer the faults.
SPARED = ("aiokafka-",)


@dataclass
class Proxied:
    """A broker of a test module's own, advertised at a proxy in front of it."""

    proxy: TcpProxy
    broker: EmbeddedBroker  # as the worker sees it: through the proxy
    direct: str  # the broker's own address, for the test's clients


@contextlib.contextmanager
def proxied_broker(log_file: Path, auto_create: bool = True) -> Iterator[Proxied]:
    """Start a broker behind a `TcpProxy` that spares the tests' own clients (faults must not
    reach other tests, hence a broker of its own)."""
    port = free_port()
    with TcpProxy(port, spare=SPARED, auto_create=auto_create) as proxy:
        running = start_broker(port, log_file=log_file, advertised_port=proxy.port)
        try:
            yield Proxied(proxy, EmbeddedBroker(proxy.port, running.process), running.bootstrap)
        finally:
            running.stop()
