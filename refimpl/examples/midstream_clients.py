"""What each client does when a stream fails half-way.  Measured, not assumed.

Strategy
--------
Once a stream's ``200`` and its first tokens are on the wire, the server can
no longer send a status code.  Ours says "this failed" inside the stream
(``refimpl/patterns/errors.py``, DESIGN §3): one ``event: error`` whose data
is the OpenAI error object, then the body ends cleanly with no
``data: [DONE]``.  Whether the *application* hears about it depends entirely
on the client library it reads the stream with, and lesson 07 shows that
they disagree.

Each function below is one client, written the way its documentation says
to stream, pointed at our server with ``simulate.fail_after_tokens``.  It
returns an :class:`Outcome`: the text the client handed over before it
stopped, and what it raised (or, for httpx-sse, the error event it showed
us).  ``tests/test_midstream_clients.py`` runs every one against a real
server and pins the result exactly, and runs the Node clients
(``tests/js/midstream_*.test.mjs``, the seed's reader in ``seed_fetch.mjs``)
the same way.  What was measured (openai 3.57, langchain-openai 1.8.1,
litellm 1.83.0); every client first hands over the text sent before the
failure, and none sends the request again:

============  ========================================================
client        at the ``event: error``
============  ========================================================
openai        raises ``openai.APIError``, sync and async alike: the
              base class (no status mid-stream), ``.code`` and
              ``.body`` from the error object
LangChain     lets the same ``openai.APIError`` through
LiteLLM       raises ``litellm.exceptions.MidStreamFallbackError``
              (meant for its Router's fallbacks), the partial text in
              ``.generated_content``; a made-up status 500 and no
              ``.code``: only the message still names the failure
httpx-sse     raises nothing: ``sse.event == "error"`` is ours to see
naive reader  ``KeyError: 'choices'``, by accident: it takes the
              error's ``data:`` line for a chunk; the message is lost
============  ========================================================

The imports of the optional libraries sit inside each function so that each
region shows everything a reader needs, and importing this module costs
nothing (litellm alone takes seconds to import).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from .naive_sse import line_buffered_data

MODEL = "refimpl-sim"
PROMPT = "Why should tokens stream?"
MESSAGES = [{"role": "user", "content": PROMPT}]


@dataclass(frozen=True)
class Outcome:
    """What one client made of a stream that failed after a few tokens."""

    text: str  # the content it handed over before it stopped
    error: str | None = None  # the class it raised ("openai.APIError"); None: it raised nothing
    message: str | None = None  # str() of that exception
    error_event: dict[str, Any] | None = None  # httpx-sse: the `event: error`'s data, parsed
    exception: BaseException | None = field(default=None, repr=False, compare=False)

    @classmethod
    def raised(cls, text: str, err: BaseException) -> Outcome:
        kind = type(err)
        name = (
            kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
        )
        return cls(text, name, str(err), exception=err)


# region: openai-sync
def with_openai(url: str, simulate: dict[str, Any]) -> Outcome:
    import openai

    text = ""
    with openai.OpenAI(base_url=f"{url}/v1", api_key="unused") as client:
        try:
            stream = client.chat.completions.create(
                model=MODEL, messages=MESSAGES, stream=True, extra_body={"simulate": simulate}
            )
            for chunk in stream:
                text += chunk.choices[0].delta.content or ""
        except openai.APIError as err:  # raised by the loop, at the `event: error`
            return Outcome.raised(text, err)  # err.code, err.body: the server's error object
    return Outcome(text)


# endregion: openai-sync


# region: openai-async
async def with_openai_async(url: str, simulate: dict[str, Any]) -> Outcome:
    import openai

    text = ""
    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused") as client:
        try:
            stream = await client.chat.completions.create(
                model=MODEL, messages=MESSAGES, stream=True, extra_body={"simulate": simulate}
            )
            async for chunk in stream:
                text += chunk.choices[0].delta.content or ""
        except openai.APIError as err:  # the same exception as the sync client's
            return Outcome.raised(text, err)
    return Outcome(text)


# endregion: openai-async


# region: langchain
def with_langchain(url: str, simulate: dict[str, Any]) -> Outcome:
    import openai
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model=MODEL, base_url=f"{url}/v1", api_key="unused", extra_body={"simulate": simulate})
    text = ""
    try:
        for chunk in llm.stream(PROMPT):
            text += chunk.content
    except openai.APIError as err:  # LangChain lets the SDK's exception through
        return Outcome.raised(text, err)
    return Outcome(text)


# endregion: langchain


# region: litellm
def with_litellm(url: str, simulate: dict[str, Any]) -> Outcome:
    # litellm downloads a model price list at import; we have no use for it.
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import litellm
    from litellm.exceptions import MidStreamFallbackError

    text = ""
    try:
        stream = litellm.completion(
            model=f"openai/{MODEL}",  # "openai/": speak OpenAI's protocol to api_base
            api_base=f"{url}/v1",
            api_key="unused",
            messages=MESSAGES,
            stream=True,
            extra_body={"simulate": simulate},
        )
        for chunk in stream:
            text += chunk.choices[0].delta.content or ""
    except MidStreamFallbackError as err:  # made for its Router, to continue on another model
        return Outcome.raised(text, err)  # err.generated_content == text
    return Outcome(text)


# endregion: litellm


# region: httpx-sse
def with_httpx_sse(url: str, simulate: dict[str, Any]) -> Outcome:
    from httpx_sse import connect_sse

    body = {"model": MODEL, "messages": MESSAGES, "stream": True, "simulate": simulate}
    text = ""
    with (
        httpx.Client() as client,
        connect_sse(client, "POST", f"{url}/v1/chat/completions", json=body) as source,
    ):
        for sse in source.iter_sse():
            if sse.event == "error":  # httpx-sse parses the event; acting on it is our job
                return Outcome(text, error_event=json.loads(sse.data))
            if sse.data == "[DONE]":
                break
            text += json.loads(sse.data)["choices"][0]["delta"].get("content") or ""
    return Outcome(text)


# endregion: httpx-sse


# region: naive-stream
def naive_stream(url: str, body: dict[str, Any], on_token: Callable[[str], None]) -> None:
    """BROKEN: the seed article's fetch reader in Python (see seed_fetch.mjs):
    split at LF, keep 'data: ' lines, stop at [DONE], ignore everything else."""
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        # lesson 01's line splitter (it returns once the body has ended)
        for data in line_buffered_data(response.iter_bytes()):
            if data == "[DONE]":
                return
            chunk = json.loads(data)
            content = chunk["choices"][0]["delta"].get("content")
            if content:
                on_token(content)


# endregion: naive-stream


def with_naive_reader(url: str, simulate: dict[str, Any]) -> Outcome:
    """Run :func:`naive_stream` and record whatever it does."""
    tokens: list[str] = []
    body = {"model": MODEL, "messages": MESSAGES, "stream": True, "simulate": simulate}
    try:
        naive_stream(url, body, tokens.append)
    except Exception as err:  # it has no idea what an error looks like: record anything
        return Outcome.raised("".join(tokens), err)
    return Outcome("".join(tokens))
