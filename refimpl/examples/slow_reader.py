"""A client that reads slower than the model writes: lesson 10's workload.

Strategy
--------
Backpressure is about a reader that falls behind, so lesson 10 needs one
whose pace we set exactly: :func:`read_slowly` streams one chat request
(with a backpressure policy in its body), reads at full speed for
``fast_for`` seconds, then takes only ``tokens_per_s`` tokens per second
(0: it stops reading, a stalled client).  It records two curves on the
client's clock, in seconds since the request was sent:

* ``received``: the tokens the client had after each content event it parsed;
* ``made``: the tokens the model had made, sampled every ``sample_every``
  seconds from the server's ``GET /v1/debug/generations/{id}``
  (``completion_tokens``), stamped when the answer arrived (a round trip on
  loopback, about a millisecond late).

Sampling from the client side keeps both curves on one clock: a notebook's
server runs its own ``trio.run`` in another thread, and its trace stamps
are on that loop's clock (trio gives each run a random offset, so two runs'
clocks are never comparable), so its events are placed by a common event
(:func:`refimpl.figures.flow_runs` aligns them on the first token).

Why a pace in *tokens* per second.  The policies speak in tokens
(``--min-tokens-per-s``, ``--coalesce-max-tokens``), and the consumers that
fall behind a model often do too: a voice assistant speaking the answer, a
relay to a slower client, a page that renders per token.  Such a reader
gains nothing from bigger chunks, so the three policies can be compared on
one reader: what changes is what the *model* does meanwhile.  (A reader
limited in *bytes* per second, a slow link, is the other kind: coalescing
cuts the ~200 bytes of JSON that wrap each token, and it then catches up.
Lesson 10's "Push on it" asks you to try it.)

Why a raw socket, and not httpx.  Backpressure reaches the server only when
the bytes stop being read from the socket.  httpx (httpcore) reads up to
64 KiB per ``recv`` into its own buffer and hands the body out from there,
and it sets socket options only after connecting, when the receive window
is already advertised; a paced loop over ``aiter_raw`` would pace httpx's
buffer, not the socket, and the server would see a reader that took 64 KiB
(about 300 tokens of SSE) at once.  So this client speaks HTTP/1.1 through
``h11`` over a socket whose receive buffer is set *before* ``connect``
(``rcvbuf``, 4 KiB by default, so the window it advertises is small too),
and once slowed it reads ``bite`` bytes at a time, only when its pace allows.

Nothing in ``refimpl`` imports this module; ``notebooks/10-backpressure.ipynb``
and ``tests/test_slow_reader.py`` run it, and so can you, against a running
server::

    .venv/bin/python -m refimpl.examples.slow_reader --policy pause --seconds 5
"""

from __future__ import annotations

import argparse
import json
import socket
from dataclasses import dataclass, field
from functools import partial
from typing import Any
from urllib.parse import urlsplit

import h11
import httpx
import trio

from ..model import count_tokens
from ..sse import SSEParser


@dataclass
class Reading:
    """What one slow reader saw; times are seconds since the request."""

    id: str = ""  # the generation id (X-Request-Id)
    policy: str = ""  # the request's "backpressure" field ("" for the server's)
    slowed_at: float | None = None  # when the reader slowed down (None: it never did)
    # (seconds, tokens received so far) after each content event.
    received: list[tuple[float, int]] = field(default_factory=list)
    # (seconds, tokens the model had made), sampled from the server.
    made: list[tuple[float, int]] = field(default_factory=list)
    chunks: list[int] = field(default_factory=list)  # tokens per content event, in order
    bytes: int = 0  # read from the socket, headers and framing included
    text: str = ""
    # "done" ([DONE]), "error" (an error event: see ``error``), "left" (we hung
    # up after ``stop_after`` seconds) or "cut" (the connection ended first).
    ending: str = ""
    error: dict[str, Any] | None = None
    ended: float = 0.0

    @property
    def tokens(self) -> int:
        return self.received[-1][1] if self.received else 0

    def made_by(self, at: float) -> int:
        """The model's count in the last sample taken at or before ``at``."""
        return max((n for t, n in self.made if t <= at), default=0)

    def received_by(self, at: float) -> int:
        return max((n for t, n in self.received if t <= at), default=0)

    def most_ahead(self) -> int:
        """The most tokens the model had made that the client had not received."""
        return max((n - self.received_by(t) for t, n in self.made), default=0)


async def read_slowly(
    url: str,
    body: dict[str, Any],
    *,
    fast_for: float,
    tokens_per_s: float,
    stop_after: float,
    sample_every: float = 0.02,
    rcvbuf: int = 4096,
    bite: int = 512,
) -> Reading:
    """POST ``body`` (streamed) to the server at ``url``; read at full speed
    for ``fast_for`` seconds, then ``tokens_per_s`` tokens per second (0:
    stop reading); hang up after ``stop_after`` seconds unless the stream
    ended first.  Never raises for what the server does: it is in the
    :class:`Reading`."""
    reading = Reading(policy=body.get("backpressure") or "")
    where = urlsplit(url)  # a base URL, maybe with a path: http://127.0.0.1:8000/broken/zombie
    origin = f"{where.scheme}://{where.netloc}"  # the debug route is at the server's root
    with trio.socket.socket() as sock:
        # Before connect, so that the window advertised in the handshake is
        # small too; Linux doubles the value for its bookkeeping.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        await sock.connect((where.hostname, where.port))
        stream, conn = trio.SocketStream(sock), h11.Connection(h11.CLIENT)
        start = trio.current_time()
        target = where.path.rstrip("/") + "/v1/chat/completions"
        await stream.send_all(_request(conn, where.hostname, target, {**body, "stream": True}))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_sample_made, origin, reading, start, sample_every)
            with trio.move_on_after(stop_after):
                await _read(stream, conn, reading, start, fast_for, tokens_per_s, bite)
            reading.ending = reading.ending or "left"
            reading.ended = trio.current_time() - start
            nursery.cancel_scope.cancel()
    # One last sample, now that we are gone (a policy may have ended it).
    if reading.id:
        async with httpx.AsyncClient() as client:
            trace = (await client.get(f"{origin}/v1/debug/generations/{reading.id}")).json()
        reading.made.append((trio.current_time() - start, trace["completion_tokens"]))
    return reading


# region: slow-read
async def _read(
    stream: trio.SocketStream,
    conn: h11.Connection,
    reading: Reading,
    start: float,
    fast_for: float,
    tokens_per_s: float,
    bite: int,
) -> None:
    parser, base = SSEParser(), 0  # base: tokens received when we slowed down
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError:  # the server closed mid-body
            reading.ending = "cut"
            return
        if event is h11.NEED_DATA:
            now = trio.current_time() - start
            if now >= fast_for:  # slowed down: first "use up" the tokens we have
                if reading.slowed_at is None:
                    reading.slowed_at, base = now, reading.tokens
                if tokens_per_s <= 0:  # a stalled client: it never reads again
                    await trio.sleep_forever()
                await trio.sleep_until(start + reading.slowed_at + (reading.tokens - base) / tokens_per_s)
            # Full speed: whatever the socket has; slowed down: one small bite.
            data = await _receive(stream, 65536 if now < fast_for else bite)
            reading.bytes += len(data)
            conn.receive_data(data)  # b"": the server closed the connection
        elif isinstance(event, h11.Response):
            reading.id = dict(event.headers).get(b"x-request-id", b"").decode()
        elif isinstance(event, h11.Data):
            for sse in parser.feed(bytes(event.data)):
                _arrived(reading, sse, trio.current_time() - start)
        else:  # EndOfMessage, ConnectionClosed
            reading.ending = reading.ending or "cut"
            return


# endregion: slow-read


async def _receive(stream: trio.SocketStream, most: int) -> bytes:
    """Up to ``most`` bytes; b"" once the server has closed (or reset) it."""
    try:
        return await stream.receive_some(most)
    except trio.BrokenResourceError:
        return b""


def _arrived(reading: Reading, sse: Any, at: float) -> None:
    if sse.data == "[DONE]":
        reading.ending = "done"
        return
    payload = json.loads(sse.data)
    reading.id = reading.id or payload.get("id", "")  # a server that sends no X-Request-Id
    if sse.type == "error":
        reading.ending, reading.error = "error", payload["error"]
        return
    choices = payload.get("choices") or [{}]
    if content := choices[0].get("delta", {}).get("content"):
        reading.text += content
        reading.chunks.append(count_tokens(content))
        reading.received.append((at, reading.tokens + reading.chunks[-1]))


def _request(conn: h11.Connection, host: str, target: str, body: dict[str, Any]) -> bytes:
    payload = json.dumps(body).encode()
    headers = [("Host", host), ("Content-Type", "application/json"), ("Content-Length", str(len(payload)))]
    return (
        conn.send(h11.Request(method="POST", target=target, headers=headers))
        + conn.send(h11.Data(data=payload))
        + conn.send(h11.EndOfMessage())
    )


async def _sample_made(origin: str, reading: Reading, start: float, every: float) -> None:
    """The model's token count, from the server, on the client's clock."""
    async with httpx.AsyncClient() as client:
        while True:
            if reading.id:
                resp = await client.get(f"{origin}/v1/debug/generations/{reading.id}")
                reading.made.append((trio.current_time() - start, resp.json()["completion_tokens"]))
            await trio.sleep(every)


def main() -> None:
    """Read one stream slowly from a running server; print both curves and its trace."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the server (a base URL)")
    parser.add_argument("--policy", choices=["pause", "coalesce", "disconnect"], help="default: the server's")
    parser.add_argument("--itl-ms", type=float, default=5.0, help="the model's pace (default: 5 ms a token)")
    parser.add_argument("--fast-for", type=float, default=0.5, help="seconds at full speed first")
    parser.add_argument("--tokens-per-s", type=float, default=20.0, help="then this pace (0: stop reading)")
    parser.add_argument("--seconds", type=float, default=5.0, help="hang up after this long")
    args = parser.parse_args()
    body = {
        "model": "refimpl-sim",
        "messages": [{"role": "user", "content": "Tell me a long story."}],
        "simulate": {"ttft_ms": 0, "itl_ms": args.itl_ms, "tokens": 100_000},
    }
    if args.policy:
        body["backpressure"] = args.policy
    pace = {"fast_for": args.fast_for, "tokens_per_s": args.tokens_per_s, "stop_after": args.seconds}
    reading = trio.run(partial(read_slowly, args.url, body, **pace))
    print(f"{reading.id}, policy {reading.policy or '(the server default)'}")
    print("    s   made  received")
    step = max(0.5, round(reading.ended / 10) / 2)  # about 20 rows
    for i in range(1, int(reading.ended / step) + 1):
        print(f"{i * step:5.1f}  {reading.made_by(i * step):5}  {reading.received_by(i * step):8}")
    error = f" {reading.error.get('code')}" if reading.error else ""
    print(f"the client: {reading.ending}{error} at {reading.ended:.2f} s, {reading.tokens} tokens", end="")
    print(f" in {len(reading.chunks)} chunks ({reading.bytes:,} bytes)")
    trace = httpx.get(f"{args.url.rstrip('/')}/v1/debug/generations/{reading.id}").json()
    zero = trace["events"][0]["at"]
    named = [
        (e["name"] + (f"({e['detail']})" if e["detail"] else ""), e["at"] - zero) for e in trace["events"]
    ]
    print("the trace:", ", ".join(f"{name} {at:.2f} s" for name, at in named))


if __name__ == "__main__":
    main()
