"""HTTP/2 flow control: a stream whose window is never reopened pauses its
own model, and only its own (h2c, a raw `h2` client on a real socket).

On one HTTP/2 connection each stream has its own flow-control window (RFC
9113 §5.2).  Our client acknowledges the bytes of stream A only at the
connection level (so the connection's window stays open for its sibling)
and never for the stream itself; stream B it reads normally.  The server
must then stop writing A once A's window is spent, which in the pull design
means A's model stops too (lesson 10: nothing buffered, so nothing grows),
while B runs to its end on the same connection.  If hypercorn buffered A's
writes past the window, A's writer would never block and its model would
run on: the token count of A's generation is what this test watches.
"""

from __future__ import annotations

import json

import h2.config
import h2.connection
import h2.events
import pytest
import trio
import trio.testing
from conftest import chat_body

A_TOKENS = 1_000_000  # "forever" at itl 0, unless something stops it
B_TOKENS = 2_000
#: What A may make at most: its 65,535-byte window holds a few hundred
#: chunks; a batch or two more may sit in hypercorn's and h2's hands.
A_BOUND = 2_000


def request(conn: h2.connection.H2Connection, stream_id: int, authority: str, body: dict) -> None:
    data = json.dumps(body).encode()
    headers = [
        (":method", "POST"),
        (":path", "/v1/chat/completions"),
        (":scheme", "http"),
        (":authority", authority),
        ("content-type", "application/json"),
        ("content-length", str(len(data))),
    ]
    conn.send_headers(stream_id, headers)
    conn.send_data(stream_id, data, end_stream=True)


@pytest.mark.xfail(
    strict=True,
    reason="hypercorn 0.18's HTTP/2 StreamBuffer releases its writer on an empty pop (a closed"
    " window pops 0 bytes, and 0 is 'below low water'), so the server buffers stream A without"
    " bound and its model runs on: 1,000,000 tokens made for 293 bytes sent. Patching the"
    " release alone (remaining buffer below low water) bounded A at 384 tokens but left A"
    " blocked in hypercorn's priority tree with its window open; both belong to the HTTP/2 issue.",
)
async def test_a_closed_window_pauses_its_own_stream_only(server):
    host_port = server.url.removeprefix("http://")
    host, port = host_port.rsplit(":", 1)
    sock = await trio.open_tcp_stream(host, int(port))
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    a, b = 1, 3
    simulate = {"ttft_ms": 0, "itl_ms": 0}
    request(conn, a, host_port, chat_body("A", stream=True, simulate={**simulate, "tokens": A_TOKENS}))
    request(conn, b, host_port, chat_body("B", stream=True, simulate={**simulate, "tokens": B_TOKENS}))
    await sock.send_all(conn.data_to_send())

    ids: dict[int, str] = {}
    b_body, b_ended = b"", False
    with trio.fail_after(30):
        while not b_ended:  # B, the sibling, runs to its end
            data = await sock.receive_some(65536)
            assert data, "the server closed the connection"
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    ids[event.stream_id] = dict(event.headers)[b"x-request-id"].decode()
                elif isinstance(event, h2.events.DataReceived):
                    n = event.flow_controlled_length
                    if event.stream_id == b:
                        b_body += event.data
                        conn.acknowledge_received_data(n, b)  # stream and connection
                    else:
                        conn.increment_flow_control_window(n)  # the connection only
                elif isinstance(event, h2.events.StreamEnded) and event.stream_id == b:
                    b_ended = True
            await sock.send_all(conn.data_to_send())

    assert b_body.rstrip().endswith(b"data: [DONE]")  # the sibling ran to its end
    a_gen = server.engine.get(ids[a])
    await trio.testing.wait_all_tasks_blocked()
    made = a_gen.completion_tokens
    assert not a_gen.finished and made < A_BOUND, made  # A's model stood still
    await trio.testing.wait_all_tasks_blocked()
    assert a_gen.completion_tokens == made  # and stays still while nobody reads A
    await sock.aclose()
