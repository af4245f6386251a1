"""gRPC interop: the stock ``grpcio`` client (sync and aio) against ``refimpl.v1.ChatService``.

The server is the real one (hypercorn, h2c, the same port as SSE); grpcio
runs in a worker thread (sync) or in its own asyncio loop in a thread (aio),
exactly as a user's program would.  We synchronise on the server's trace
(``Generation.ended``), never on sleeps.
"""

from __future__ import annotations

import asyncio
import json
import queue
from collections.abc import Iterator

import grpc
import grpc.aio
import httpx
import pytest
import trio
import trio.testing
from conftest import TEST_SIMULATE, Server, chat_body
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from refimpl.app import create_app, serve
from refimpl.config import Config
from refimpl.model import simulated_text
from refimpl.v1 import chat_pb2 as pb
from refimpl.v1 import chat_pb2_grpc

SLOW = pb.Simulate(itl_ms=200, tokens=1000)


def request(content: str = "Hello", **knobs) -> pb.ChatRequest:
    simulate = knobs.pop("simulate", None)
    return pb.ChatRequest(
        model="refimpl-sim", messages=[pb.Message(role="user", content=content)], simulate=simulate, **knobs
    )


def target(server) -> str:
    return server.url.removeprefix("http://")


def stub_for(channel: grpc.Channel) -> chat_pb2_grpc.ChatServiceStub:
    return chat_pb2_grpc.ChatServiceStub(channel)


def status_of(err: grpc.RpcError) -> tuple[grpc.StatusCode, str, dict]:
    """The status code, the OpenAI code (ErrorInfo.reason) and its metadata."""
    status = rpc_status.from_call(err)
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    return err.code(), info.reason, dict(info.metadata)


async def sse_content(client, server, **body) -> str:
    resp = await client.post(f"{server.url}/v1/chat/completions", json=chat_body(**body))
    return resp.json()["choices"][0]["message"]["content"]


async def ended(server, gen_id: str) -> dict:
    gen = server.engine.get(gen_id)
    with trio.fail_after(10):
        await gen.ended.wait()
    return gen.to_json()


async def only_active(server):
    """The one generation running now (a call whose headers we have not seen)."""
    with trio.fail_after(10):
        while len(server.engine.active) + len(server.engine.queued) != 1:
            await trio.testing.wait_all_tasks_blocked()
    return next(iter({**server.engine.active, **server.engine.queued}.values()))


# -- server streaming: content, usage ------------------------------------------
async def test_sync_client_streams_the_same_content_as_sse(server, client):
    def call() -> tuple[list[pb.ChatChunk], dict]:
        with grpc.insecure_channel(target(server)) as channel:
            stream = stub_for(channel).StreamChat(request("Same?", seed=7), timeout=10)
            return list(stream), dict(stream.initial_metadata())

    chunks, headers = await trio.to_thread.run_sync(call)
    text = "".join(c.content for c in chunks)
    assert text == await sse_content(client, server, content="Same?", seed=7)
    first, *body, last = chunks
    assert first == pb.ChatChunk(id=headers["x-request-id"])  # at once: the headers leave with it
    assert all(c.content and not c.finish_reason and not c.HasField("usage") for c in body)
    assert (last.content, last.finish_reason) == ("", "stop")
    assert (last.usage.prompt_tokens, last.usage.completion_tokens, last.usage.total_tokens) == (2, 24, 26)
    assert {c.id for c in chunks} == {headers["x-request-id"]}
    trace = await ended(server, last.id)
    assert trace["protocol"] == "grpc" and trace["events"][-1]["name"] == "done"


async def test_aio_client_streams_the_same_content_as_sse(server, client):
    async def call() -> list[pb.ChatChunk]:
        async with grpc.aio.insecure_channel(target(server)) as channel:
            return [c async for c in stub_for(channel).StreamChat(request("aio", max_tokens=9), timeout=10)]

    chunks = await trio.to_thread.run_sync(asyncio.run, call())
    assert "".join(c.content for c in chunks) == await sse_content(
        client, server, content="aio", max_tokens=9
    )
    assert (chunks[-1].finish_reason, chunks[-1].usage.completion_tokens) == ("length", 9)


# -- errors --------------------------------------------------------------------
@pytest.mark.parametrize(
    ("fail_with", "code", "type_"),
    [
        ("overloaded", grpc.StatusCode.UNAVAILABLE, "server_error"),
        ("timeout", grpc.StatusCode.DEADLINE_EXCEEDED, "server_error"),
        ("model_error", grpc.StatusCode.INTERNAL, "server_error"),
        ("internal_error", grpc.StatusCode.INTERNAL, "server_error"),
        ("content_filter", grpc.StatusCode.INVALID_ARGUMENT, "invalid_request_error"),
        ("crash", grpc.StatusCode.INTERNAL, "server_error"),
    ],
)
async def test_a_mid_stream_failure_ends_the_call_with_a_status(server, fail_with, code, type_):
    simulate = pb.Simulate(tokens=10, fail_after_tokens=3, fail_with=fail_with)

    def call() -> tuple[list[str], grpc.RpcError]:
        got = []
        with grpc.insecure_channel(target(server)) as channel:
            try:
                for chunk in stub_for(channel).StreamChat(request(simulate=simulate), timeout=10):
                    got.append(chunk.content)
            except grpc.RpcError as err:
                return got, err
        raise AssertionError("the call ended without an error")

    got, err = await trio.to_thread.run_sync(call)
    openai_code = "internal_error" if fail_with == "crash" else fail_with
    assert len("".join(got).split(" ")) >= 3  # the tokens before the failure arrived
    assert status_of(err) == (code, openai_code, {"type": type_})
    assert err.details().startswith(f"{openai_code}: ")


async def test_a_bad_request_is_invalid_argument_naming_the_param(server):
    def call() -> grpc.RpcError:
        with grpc.insecure_channel(target(server)) as channel:
            try:
                list(stub_for(channel).StreamChat(request(simulate=pb.Simulate(fail_with="nope"))))
            except grpc.RpcError as err:
                return err
        raise AssertionError("accepted a bad request")

    err = await trio.to_thread.run_sync(call)
    assert status_of(err) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "invalid_value",
        {"type": "invalid_request_error", "param": "simulate.fail_with"},
    )
    assert not server.engine.active


async def test_a_full_queue_is_resource_exhausted(start_server):
    server = await start_server(max_active=1, max_queue=0)

    def call() -> tuple[grpc.RpcError, list[str]]:
        with grpc.insecure_channel(target(server)) as channel:
            stub = stub_for(channel)
            first = stub.StreamChat(request(simulate=SLOW), timeout=10)
            next(first)  # the only slot is taken
            try:
                list(stub.StreamChat(request()))
            except grpc.RpcError as err:
                first.cancel()
                return err, [k for k, _ in err.trailing_metadata()]
        raise AssertionError("admitted past the limit")

    err, _ = await trio.to_thread.run_sync(call)
    assert status_of(err)[:2] == (grpc.StatusCode.RESOURCE_EXHAUSTED, "too_many_requests")


# -- cancellation (lesson 09) ----------------------------------------------------
async def test_client_cancel_stops_the_model_at_once(server):
    def call() -> str:
        with grpc.insecure_channel(target(server)) as channel:
            stream = stub_for(channel).StreamChat(request(simulate=SLOW), timeout=30)
            first = next(stream)
            stream.cancel()  # RST_STREAM(CANCEL), long before the next token
            with pytest.raises(grpc.RpcError) as err:
                list(stream)
            assert err.value.code() == grpc.StatusCode.CANCELLED
            return first.id

    trace = await ended(server, await trio.to_thread.run_sync(call))
    last = trace["events"][-1]
    assert (last["name"], last["detail"]) == ("cancelled", "client_cancel")
    assert trace["completion_tokens"] <= 2
    assert not server.engine.active


async def test_a_cancel_from_another_connection_ends_the_call_cancelled(server):
    """POST /v1/chat/completions/{id}/cancel (lesson 11) reaches a gRPC call too."""

    def call() -> tuple[str, grpc.RpcError]:
        with grpc.insecure_channel(target(server)) as channel:
            stream = stub_for(channel).StreamChat(request(simulate=SLOW), timeout=30)
            first = next(stream)
            answer = httpx.post(f"{server.url}/v1/chat/completions/{first.id}/cancel")
            assert answer.json()["status"] == "cancelled"
            with pytest.raises(grpc.RpcError) as err:
                list(stream)
            return first.id, err.value

    gen_id, err = await trio.to_thread.run_sync(call)
    assert status_of(err)[:2] == (grpc.StatusCode.CANCELLED, "client_cancel")
    last = (await ended(server, gen_id))["events"][-1]
    assert (last["name"], last["detail"]) == ("cancelled", "client_cancel")


async def test_cancel_before_the_first_token(server):
    cancel = trio.Event()
    token = trio.lowlevel.current_trio_token()

    def call() -> None:
        with grpc.insecure_channel(target(server)) as channel:
            stream = stub_for(channel).StreamChat(request(simulate=pb.Simulate(ttft_ms=60_000)), timeout=30)
            trio.from_thread.run(cancel.wait, trio_token=token)
            stream.cancel()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.to_thread.run_sync, call)
        gen = await only_active(server)
        cancel.set()
    trace = await ended(server, gen.id)
    assert [e["name"] for e in trace["events"]] == ["accepted", "cancelled"]
    assert trace["events"][-1]["detail"] == "client_cancel"


async def test_a_deadline_cancels_the_generation(server):
    def call() -> grpc.RpcError:
        with grpc.insecure_channel(target(server)) as channel:
            try:
                list(stub_for(channel).StreamChat(request(simulate=pb.Simulate(ttft_ms=60_000)), timeout=0.5))
            except grpc.RpcError as err:
                return err
        raise AssertionError("no deadline")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.to_thread.run_sync, call)
        gen = await only_active(server)
    trace = await ended(server, gen.id)
    assert trace["events"][-1]["name"] == "cancelled"
    assert trace["events"][-1]["detail"] == "deadline"
    assert not server.engine.active


# -- bidi Chat: the WebSocket's turns ---------------------------------------------
class Outbox:
    """The client's side of a bidi call: messages to send, then a half-close."""

    def __init__(self) -> None:
        self.queue: queue.Queue[pb.ClientMessage | None] = queue.Queue()

    def __iter__(self) -> Iterator[pb.ClientMessage]:
        while (message := self.queue.get()) is not None:
            yield message

    def chat(self, **knobs) -> None:
        self.queue.put(pb.ClientMessage(chat=request(**knobs)))

    def cancel(self) -> None:
        self.queue.put(pb.ClientMessage(cancel=pb.Cancel()))

    def close(self) -> None:
        self.queue.put(None)


async def test_bidi_turns_cancel_and_errors_on_one_call(server):
    def call() -> list[pb.ServerMessage]:
        out, seen = Outbox(), []
        with grpc.insecure_channel(target(server)) as channel:
            out.chat(max_tokens=5)
            for message in stub_for(channel).Chat(iter(out), timeout=30):
                seen.append(message)
                kinds = [m.WhichOneof("kind") for m in seen]
                if kinds[-1] == "done":  # turn 2: a slow one; a second chat; a cancel
                    out.chat(simulate=SLOW)
                elif kinds[-1] == "token" and "done" in kinds and kinds.count("error") == 0:
                    out.chat()  # while one runs: generation_in_progress, the turn goes on
                elif kinds[-1] == "error" and kinds.count("error") == 1:
                    out.cancel()
                elif kinds[-1] == "cancelled":
                    out.chat(simulate=pb.Simulate(fail_with="nope"))  # a bad turn
                elif kinds[-1] == "error":
                    out.close()  # half-close: the call ends
        return seen

    seen = await trio.to_thread.run_sync(call)
    kinds = [m.WhichOneof("kind") for m in seen]
    assert kinds == ["token"] * kinds.index("done") + ["done", "token", "error", "cancelled", "error"]
    done, busy, cancelled, bad = (m for m in seen if m.WhichOneof("kind") != "token")
    assert (done.done.finish_reason, done.done.usage.completion_tokens) == ("length", 5)
    assert busy.error.code == "generation_in_progress"
    assert (cancelled.cancelled.reason, cancelled.cancelled.usage.completion_tokens) == ("client_cancel", 1)
    assert (bad.error.code, bad.error.param) == ("invalid_value", "simulate.fail_with")
    trace = await ended(server, cancelled.cancelled.id)
    assert trace["events"][-1]["detail"] == "client_cancel"
    assert not server.engine.active


async def test_bidi_call_cancelled_mid_turn_cancels_its_generation(server):
    def call() -> str:
        out = Outbox()
        out.chat(simulate=SLOW)
        with grpc.insecure_channel(target(server)) as channel:
            stream = stub_for(channel).Chat(iter(out), timeout=30)
            first = next(stream)
            stream.cancel()
            out.close()
            return first.token.id

    trace = await ended(server, await trio.to_thread.run_sync(call))
    assert (trace["events"][-1]["name"], trace["events"][-1]["detail"]) == ("cancelled", "client_cancel")


# -- heartbeats: a chunk with only the id, during a silence (lesson 08) ------------
async def test_a_silent_call_sends_heartbeat_chunks(start_server):
    server = await start_server(heartbeat=0.05)

    def call() -> list[pb.ChatChunk]:
        with grpc.insecure_channel(target(server)) as channel:
            slow = pb.Simulate(ttft_ms=300, tokens=3)
            return list(stub_for(channel).StreamChat(request(simulate=slow), timeout=30))

    chunks = await trio.to_thread.run_sync(call)
    trace = await ended(server, chunks[0].id)
    beats = [e for e in trace["events"] if e["name"] == "heartbeat"]
    silent = [c for c in chunks[1:-1] if not c.content]
    assert beats and len(silent) == len(beats)  # one empty chunk per heartbeat in the trace
    assert all(c == pb.ChatChunk(id=chunks[0].id) for c in silent)
    assert "".join(c.content for c in chunks) == "".join(simulated_text("Hello", 0)[:3])


# -- load ------------------------------------------------------------------------
async def test_200_concurrent_streams_on_one_channel(server, client):
    """Each of 200 calls multiplexed on one HTTP/2 connection arrives whole."""
    expected = await sse_content(client, server, content="many", max_tokens=50)

    async def calls() -> list[str]:
        async with grpc.aio.insecure_channel(target(server)) as channel:
            stub = stub_for(channel)

            async def one() -> str:
                chunks = [c async for c in stub.StreamChat(request("many", max_tokens=50), timeout=60)]
                return "".join(c.content for c in chunks)

            return await asyncio.gather(*(one() for _ in range(200)))

    texts = await trio.to_thread.run_sync(asyncio.run, calls())
    assert texts == [expected] * 200
    assert not server.engine.active


# -- Connect over HTTP/1.1 (what the demo page's fetch speaks) -------------------
def envelope(message: dict, flags: int = 0) -> bytes:
    data = json.dumps(message).encode()
    return bytes([flags]) + len(data).to_bytes(4, "big") + data


def unenvelope(body: bytes) -> list[tuple[int, dict]]:
    out = []
    while body:
        flags, size = body[0], int.from_bytes(body[1:5], "big")
        out.append((flags, json.loads(body[5 : 5 + size])))
        body = body[5 + size :]
    return out


async def test_connect_json_over_http1_streams_the_same_content(server, client):
    """The Connect protocol: a plain POST with enveloped JSON messages; the
    last envelope (flag 0x02) ends the stream, with the error if any."""
    ask = {"messages": [{"role": "user", "content": "connect"}], "maxTokens": 6}
    resp = await client.post(
        f"{server.url}/refimpl.v1.ChatService/StreamChat",
        content=envelope(ask),
        headers={"content-type": "application/connect+json", "connect-protocol-version": "1"},
    )
    assert resp.http_version == "HTTP/1.1" and resp.status_code == 200
    *chunks, (end_flags, end) = unenvelope(resp.content)
    assert end_flags == 0x02 and "error" not in end
    assert "".join(c.get("content", "") for _, c in chunks) == await sse_content(
        client, server, content="connect", max_tokens=6
    )
    assert chunks[-1][1]["finishReason"] == "length"
    assert chunks[-1][1]["usage"]["completionTokens"] == "6"  # int64 is a string in JSON

    bad = await client.post(
        f"{server.url}/refimpl.v1.ChatService/StreamChat",
        content=envelope({**ask, "simulate": {"failAfterTokens": "2", "failWith": "overloaded"}}),
        headers={"content-type": "application/connect+json"},
    )
    (_, end) = unenvelope(bad.content)[-1]
    assert end["error"]["code"] == "unavailable" and end["error"]["message"].startswith("overloaded: ")


# -- heartbeats (lesson 08): the server answers HTTP/2 PINGs while silent ---------
async def test_keepalive_pings_are_answered_while_the_model_is_silent(server):
    """grpcio's keepalive (gRFC A8) pings every 100 ms during a 1.5 s silence
    before the first token; the call succeeds, so every ping was answered in
    time (grpcio ends the call UNAVAILABLE when one is not)."""
    options = [
        ("grpc.keepalive_time_ms", 100),
        ("grpc.keepalive_timeout_ms", 1000),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.keepalive_permit_without_calls", 1),
    ]

    def call() -> list[pb.ChatChunk]:
        with grpc.insecure_channel(target(server), options=options) as channel:
            return list(stub_for(channel).StreamChat(request(simulate=pb.Simulate(ttft_ms=1500)), timeout=30))

    chunks = await trio.to_thread.run_sync(call)
    assert chunks[-1].finish_reason == "stop"


# -- graceful shutdown ---------------------------------------------------------------
async def test_shutdown_ends_grpc_calls_with_unavailable(nursery):
    """The drain (patterns/shutdown.py) ends a running StreamChat and an idle
    bidi Chat with UNAVAILABLE / server_shutdown, and the server stops."""
    app = create_app(Config(simulate=TEST_SIMULATE, drain_timeout=0.2))
    trigger, stopped = trio.Event(), trio.Event()

    async def run_server(task_status=trio.TASK_STATUS_IGNORED):
        await serve(app, shutdown_trigger=trigger.wait, task_status=task_status)
        stopped.set()

    server = Server(await nursery.start(run_server), app)
    results: dict[str, tuple] = {}

    def streaming() -> None:
        with grpc.insecure_channel(target(server)) as channel:
            try:
                list(stub_for(channel).StreamChat(request(simulate=pb.Simulate(ttft_ms=60_000))))
            except grpc.RpcError as err:
                results["stream"] = status_of(err)[:2]

    def idle_bidi(opened: trio.Event, token) -> None:
        out = Outbox()
        with grpc.insecure_channel(target(server)) as channel:
            call = stub_for(channel).Chat(iter(out))
            trio.from_thread.run_sync(opened.set, trio_token=token)
            try:
                list(call)
            except grpc.RpcError as err:
                results["bidi"] = status_of(err)[:2]
            out.close()

    shutdown = app.extensions["refimpl.shutdown"]
    async with trio.open_nursery() as clients:
        clients.start_soon(trio.to_thread.run_sync, streaming)
        await only_active(server)
        opened = trio.Event()
        clients.start_soon(trio.to_thread.run_sync, idle_bidi, opened, trio.lowlevel.current_trio_token())
        await opened.wait()
        with trio.fail_after(10):
            while not shutdown._sockets:  # the bidi call is tracked: it reached the handler
                await trio.testing.wait_all_tasks_blocked()
        trigger.set()
    with trio.fail_after(30):
        await stopped.wait()
    assert results == {
        "stream": (grpc.StatusCode.UNAVAILABLE, "server_shutdown"),
        "bidi": (grpc.StatusCode.UNAVAILABLE, "server_shutdown"),
    }


def test_a_slow_consumer_is_resource_exhausted_not_a_deadline():
    """A client the server dropped for reading too slowly (lesson 10) must not
    read as its own deadline passing: RESOURCE_EXHAUSTED, not the 408's
    DEADLINE_EXCEEDED."""
    from connectrpc.code import Code

    from refimpl.backend import ModelError
    from refimpl.patterns import errors

    err = errors.grpc_error(ModelError("slow_consumer", "too slow"))
    assert err.code == Code.RESOURCE_EXHAUSTED and err.message.startswith("slow_consumer: ")
