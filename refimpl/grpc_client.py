"""A trio client for ``refimpl.v1.ChatService/StreamChat`` over the stock ``grpcio``.

Strategy
--------
``refimpl chat --protocol grpc`` (lesson 05) should use what gRPC users use:
the ``grpcio`` library, not a client of our own.  grpcio has a blocking API
and an asyncio one, and neither runs on trio, so the blocking call runs in a
worker thread (``trio.to_thread``) and hands each chunk back to trio as it
arrives, stamped with ``trio.current_time()`` like the SSE and WebSocket
clients' events, so TTFT and ITL are measured the same way for all three.
If the trio side is cancelled (Ctrl-C, a timeout), the call is cancelled too:
grpcio resets the HTTP/2 stream and the server stops the model (lesson 09).

A failed call raises :class:`~refimpl.client.StreamError` with the OpenAI
error object rebuilt from the status: the code from the
``google.rpc.ErrorInfo`` detail the server sends (``patterns/errors.py``).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from functools import partial
from typing import Any
from urllib.parse import urlsplit

import trio

from .client import StreamError, StreamEvent, api_key_headers


def _channel(url: str) -> Any:
    """An insecure channel for ``http://``, TLS for ``https://`` (trusting
    ``SSL_CERT_FILE`` when set, as ``refimpl serve --tls`` suggests)."""
    import grpc

    parts = urlsplit(url)
    target = parts.netloc
    if parts.scheme != "https":
        return grpc.insecure_channel(target)
    roots = None
    if cafile := os.environ.get("SSL_CERT_FILE"):
        with open(cafile, "rb") as f:
            roots = f.read()
    return grpc.secure_channel(target, grpc.ssl_channel_credentials(roots))


def _error(err: Any) -> dict[str, Any]:
    """The OpenAI error object of a failed call."""
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    code, fields = None, {"type": "server_error"}
    status = rpc_status.from_call(err)
    for detail in status.details if status else ():
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            code, fields = info.reason or None, dict(info.metadata)
    return {"message": err.details(), "code": code, "grpc_status": err.code().name, **fields}


@trio.as_safe_channel
async def stream_chat(url: str, body: dict[str, Any]) -> AsyncIterator[StreamEvent]:
    """Stream one chat (``async with stream_chat(url, body) as events``);
    ``body`` is the JSON request of the SSE endpoint."""
    import grpc

    from .v1 import chat_pb2 as pb
    from .v1 import chat_pb2_grpc

    request = pb.ChatRequest(
        model=body.get("model", ""),
        messages=[pb.Message(role=m["role"], content=m["content"]) for m in body["messages"]],
        max_tokens=body.get("max_tokens"),
        simulate=pb.Simulate(**body.get("simulate", {})),
    )
    send, receive = trio.open_memory_channel[StreamEvent | BaseException](1)
    token = trio.lowlevel.current_trio_token()
    channel = _channel(url)
    metadata = [(k.lower(), v) for k, v in api_key_headers().items()]  # REFIMPL_API_KEY, if set
    call = chat_pb2_grpc.ChatServiceStub(channel).StreamChat(request, metadata=metadata)

    def run() -> None:  # in a worker thread: grpcio blocks
        def hand(item: StreamEvent | BaseException) -> None:
            trio.from_thread.run(send.send, item, trio_token=token)

        try:
            for chunk in call:
                usage = None
                if chunk.HasField("usage"):
                    usage = {k: getattr(chunk.usage, k) for k in _USAGE}
                at = trio.from_thread.run_sync(trio.current_time, trio_token=token)
                hand(StreamEvent(at, chunk.content, chunk.finish_reason or None, usage, chunk.id))
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.CANCELLED:  # cancelled: by us, below
                hand(StreamError(_error(err)))
        finally:
            trio.from_thread.run_sync(send.close, trio_token=token)

    failure = None
    try:
        async with trio.open_nursery() as nursery:  # as_safe_channel makes this legal
            nursery.start_soon(partial(trio.to_thread.run_sync, run, abandon_on_cancel=True))
            async for item in receive:
                if isinstance(item, BaseException):
                    failure = item  # raised below, outside the nursery's group
                    break
                yield item
        if failure is not None:
            raise failure
    finally:
        call.cancel()  # RST_STREAM if still running: the server stops the model
        channel.close()


_USAGE = ("prompt_tokens", "completion_tokens", "total_tokens")
