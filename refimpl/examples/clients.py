"""Three stock clients reading our stream: httpx-sse and the openai SDK.

(The third, curl, is ``curl_stream.sh`` beside this file; the fourth, our own
httpx + :class:`~refimpl.sse.SSEParser` client, is ``refimpl/client.py``.)
Lesson 02 includes these regions and ``tests/test_lesson_examples.py`` runs
them against a real server, so what the lesson shows is what works.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
from httpx_sse import aconnect_sse
from openai import OpenAI


# region: httpx-sse-client
async def httpx_sse_text(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> str:
    """httpx-sse does the SSE parsing; we do the OpenAI part ([DONE], errors)."""
    parts = []
    async with aconnect_sse(
        client, "POST", f"{url}/v1/chat/completions", json={**body, "stream": True}
    ) as source:
        async for sse in source.aiter_sse():
            if sse.data == "[DONE]":
                return "".join(parts)
            chunk = json.loads(sse.data)
            if sse.event == "error":
                raise RuntimeError(chunk["error"]["message"])
            for choice in chunk["choices"]:
                parts.append(choice["delta"].get("content") or "")
    raise RuntimeError("the stream ended without [DONE]")


# endregion: httpx-sse-client


# region: openai-sdk-client
def openai_sdk_text(url: str, prompt: str, simulate: dict[str, Any]) -> tuple[str, Any]:
    """The official SDK, pointed at our server.  Returns (text, usage)."""
    client = OpenAI(base_url=url + "/v1", api_key="unused")
    stream = client.chat.completions.create(
        model="refimpl-sim",
        messages=[{"role": "user", "content": prompt}],
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"simulate": simulate},  # our extension rides in the body
    )
    parts, usage = [], None
    for chunk in stream:
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
        if chunk.usage:  # only the last chunk, whose choices are []
            usage = chunk.usage
    return "".join(parts), usage


# endregion: openai-sdk-client
