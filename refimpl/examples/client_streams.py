"""Every Python client people stream with, reading one answer from our server.

Strategy
--------
Lesson 04 compares the clients an application actually uses against one
server, so each function here is one client, written the way its own
documentation says to stream, and all of them have the same shape::

    reading = with_openai(url, ask, on_token)

``ask`` is the request (prompt, simulate knobs, whether to ask for usage);
``on_token(piece)`` is called with each piece of content as the client hands
it over and returns whether to keep reading (``False``: the reader has seen
enough, the client must leave and the server should stop the model: lesson
09).  The result, a :class:`Reading`, is what the application got: the text,
and the usage the client reports, in OpenAI's field names whatever the
client calls them.

What each one gives, measured by ``tests/test_clients.py`` (and for the Node
clients ``tests/js/clients_*.test.mjs``) and tabled in lesson 04:

* the text is the non-streamed answer's, for every client;
* usage comes from the server only when the request asks for it
  (``stream_options.include_usage``; LangChain's ``stream_usage=True``).
  Otherwise every client reports none, except LiteLLM, whose
  ``stream_chunk_builder`` counts tokens itself and gets them wrong;
* leaving early closes the connection at once (the server's trace ends
  ``cancelled(client_disconnect)``) when the client is closed the way shown
  here.  Two are easy to get wrong: an openai ``Stream`` left by ``break``
  alone stays open (:func:`openai_break_only`, the broken version), and so
  does a LiteLLM stream, which has no ``close()`` of its own.

What each does with a mid-stream ``event: error`` is lesson 07's
(``midstream_clients.py``).  The imports of the optional libraries sit
inside each function so that each region shows everything it needs.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

import httpx

MODEL = "refimpl-sim"
USAGE_FIELDS = {"prompt_tokens", "completion_tokens", "total_tokens"}

#: Called with each piece of content; returns whether to keep reading.
OnToken = Callable[[str], bool]


def read_all(piece: str) -> bool:
    return True


@dataclass(frozen=True)
class Ask:
    """One request, as every client below sends it."""

    prompt: str = "Why should tokens stream?"
    simulate: dict[str, Any] | None = None  # refimpl's knobs (ttft_ms, itl_ms, tokens, seed)
    include_usage: bool = False  # stream_options.include_usage

    @property
    def messages(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": self.prompt}]

    def body(self) -> dict[str, Any]:
        """The JSON body, for the clients that build it themselves."""
        body: dict[str, Any] = {"model": MODEL, "messages": self.messages, "stream": True}
        if self.include_usage:
            body["stream_options"] = {"include_usage": True}
        if self.simulate:
            body["simulate"] = self.simulate
        return body

    def extra_body(self) -> dict[str, Any]:
        """Our extension, for the SDKs: they send ``extra_body`` as is."""
        return {"simulate": self.simulate} if self.simulate else {}


@dataclass(frozen=True)
class Reading:
    text: str
    usage: dict[str, int] | None  # prompt_tokens, completion_tokens, total_tokens; None: not reported


# region: ours
async def with_ours(url: str, ask: Ask, on_token: OnToken = read_all) -> Reading:
    """refimpl/client.py (lesson 02): httpx + our SSE parser, on trio."""
    from refimpl.client import stream_chat

    parts, usage = [], None
    async with httpx.AsyncClient() as client, aclosing(stream_chat(client, url, ask.body())) as events:
        async for event in events:
            usage = event.usage or usage
            if event.content:
                parts.append(event.content)
                if not on_token(event.content):
                    break  # aclosing closes the generator, which closes the connection
    return Reading("".join(parts), usage)


# endregion: ours


# region: httpx-sse
def with_httpx_sse(url: str, ask: Ask, on_token: OnToken = read_all) -> Reading:
    from httpx_sse import connect_sse

    parts, usage = [], None
    with (
        httpx.Client() as client,
        connect_sse(client, "POST", f"{url}/v1/chat/completions", json=ask.body()) as source,
    ):
        for sse in source.iter_sse():  # leaving the `with` closes the response
            if sse.data == "[DONE]":
                break
            chunk = json.loads(sse.data)
            if sse.event == "error":  # httpx-sse parses; the OpenAI layer is ours (lesson 07)
                raise RuntimeError(chunk["error"]["message"])
            usage = chunk.get("usage") or usage
            if chunk["choices"] and (piece := chunk["choices"][0]["delta"].get("content")):
                parts.append(piece)
                if not on_token(piece):
                    break
    return Reading("".join(parts), usage)


# endregion: httpx-sse


# region: openai-sync
def with_openai(url: str, ask: Ask, on_token: OnToken = read_all) -> Reading:
    import openai

    parts, usage = [], None
    with (
        openai.OpenAI(base_url=f"{url}/v1", api_key="unused") as client,
        client.chat.completions.create(
            model=MODEL,
            messages=ask.messages,
            stream=True,
            stream_options={"include_usage": True} if ask.include_usage else openai.omit,
            extra_body=ask.extra_body(),  # our extension rides in the body
        ) as stream,  # leaving the `with` closes the response; `break` alone does not
    ):
        for chunk in stream:
            usage = chunk.usage.model_dump(include=USAGE_FIELDS) if chunk.usage else usage  # choices []
            if chunk.choices and (piece := chunk.choices[0].delta.content):
                parts.append(piece)
                if not on_token(piece):
                    break
    return Reading("".join(parts), usage)


# endregion: openai-sync


# region: openai-async
async def with_openai_async(url: str, ask: Ask, on_token: OnToken = read_all) -> Reading:
    import openai

    parts, usage = [], None
    async with (
        openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused") as client,
        await client.chat.completions.create(
            model=MODEL,
            messages=ask.messages,
            stream=True,
            stream_options={"include_usage": True} if ask.include_usage else openai.omit,
            extra_body=ask.extra_body(),
        ) as stream,
    ):
        async for chunk in stream:
            usage = chunk.usage.model_dump(include=USAGE_FIELDS) if chunk.usage else usage
            if chunk.choices and (piece := chunk.choices[0].delta.content):
                parts.append(piece)
                if not on_token(piece):
                    break
    return Reading("".join(parts), usage)


# endregion: openai-async


# region: langchain
def with_langchain(url: str, ask: Ask, on_token: OnToken = read_all) -> Reading:
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(
        model=MODEL,
        base_url=f"{url}/v1",
        api_key="unused",
        stream_usage=ask.include_usage,  # LangChain's name for include_usage
        extra_body=ask.extra_body(),
    )
    parts, usage = [], None
    for chunk in llm.stream(ask.prompt):  # `break` closes the generator, and the SDK's stream
        if chunk.usage_metadata:  # its own names: input_tokens, output_tokens
            meta = chunk.usage_metadata
            usage = {
                "prompt_tokens": meta["input_tokens"],
                "completion_tokens": meta["output_tokens"],
                "total_tokens": meta["total_tokens"],
            }
        if chunk.content:
            parts.append(chunk.content)
            if not on_token(chunk.content):
                break
    return Reading("".join(parts), usage)


# endregion: langchain


# region: litellm
def with_litellm(url: str, ask: Ask, on_token: OnToken = read_all) -> Reading:
    # litellm downloads a model price list at import; we have no use for it.
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import litellm

    stream = litellm.completion(
        model=f"openai/{MODEL}",  # "openai/": speak OpenAI's protocol to api_base
        api_base=f"{url}/v1",
        api_key="unused",
        messages=ask.messages,
        stream=True,
        stream_options={"include_usage": True} if ask.include_usage else None,
        extra_body=ask.extra_body(),
    )
    chunks, parts = [], []
    try:
        for chunk in stream:
            chunks.append(chunk)
            if chunk.choices and (piece := chunk.choices[0].delta.content):
                parts.append(piece)
                if not on_token(piece):
                    break
    finally:
        # The wrapper has no close() (only an async aclose()), and `break`
        # leaves the SDK stream inside it open: close that one.
        stream.completion_stream.close()
    # LiteLLM's documented way to rebuild the answer, usage included.  Without
    # include_usage the server sent none, and it counts tokens itself.
    whole = litellm.stream_chunk_builder(chunks, messages=ask.messages)
    return Reading("".join(parts), whole.usage.model_dump(include=USAGE_FIELDS) if whole else None)


# endregion: litellm


# region: openai-break-only
def openai_break_only(url: str, ask: Ask, tokens: int) -> tuple[str, Any]:
    """BROKEN: read ``tokens`` pieces and ``break``, without closing the
    stream.  Returns the text and the stream, still open: the connection
    stays up, and the model keeps generating for nobody, until someone calls
    ``stream.close()`` or the garbage collector finds the stream."""
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
    stream = client.chat.completions.create(
        model=MODEL, messages=ask.messages, stream=True, extra_body=ask.extra_body()
    )
    parts = []
    for chunk in stream:
        if chunk.choices and (piece := chunk.choices[0].delta.content):
            parts.append(piece)
            if len(parts) == tokens:
                break  # the loop is over; the response is not
    return "".join(parts), stream


# endregion: openai-break-only

#: Every client above, by the name lesson 04's table gives it.
CLIENTS: dict[str, Callable[..., Any]] = {
    "ours (refimpl.client)": with_ours,
    "httpx-sse": with_httpx_sse,
    "openai": with_openai,
    "openai (async)": with_openai_async,
    "LangChain ChatOpenAI": with_langchain,
    "LiteLLM": with_litellm,
}
