"""The sans-IO half of the upstream (``refimpl/upstream_chunks.py``), without a server.

Case tables, each fed whole, byte by byte and split at every point (STYLE
§7): the items out must be the same however the bytes arrive.  Then what a
refusal means, what we ask the upstream, and a property: any bytes, cut
anywhere, give tokens and then exactly one ending, never an exception.  The same
paths against a real upstream are ``test_upstream.py``'s.
"""

from __future__ import annotations

import json
from typing import Any, NamedTuple

import pytest
from hypothesis import given
from hypothesis import strategies as st

from refimpl.backend import ModelError, ModelRequest
from refimpl.upstream_chunks import (
    GARBAGE_BYTES,
    ChunkDecoder,
    Finished,
    not_a_stream,
    refusal,
    request_body,
)


def chunk(content: str | None = None, finish: str | None = None, **extra: Any) -> bytes:
    """One ``chat.completion.chunk`` event, as an OpenAI-compatible server writes it."""
    delta = {} if content is None else {"content": content}
    body = {"id": "chatcmpl-up", "object": "chat.completion.chunk", **extra}
    body.setdefault("choices", [{"index": 0, "delta": delta, "finish_reason": finish}])
    return b"data: " + json.dumps(body).encode() + b"\n\n"


ROLE = b'data: {"id":"chatcmpl-up","choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n'
USAGE = {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}
DONE = b"data: [DONE]\n\n"


class Case(NamedTuple):
    body: bytes
    #: What the decoder says: tokens, then the ending ("error:<words in its
    #: message>" for a ModelError); END_OF_BODY: end_of_body() was needed.
    items: list[Any]
    id: str


END_OF_BODY = "<end of body>"

CASES = [
    Case(
        ROLE + chunk("Hel") + chunk("lo") + chunk(finish="stop") + DONE,
        ["Hel", "lo", Finished("stop", None)],
        "well-formed",
    ),
    Case(
        ROLE + chunk("Hi") + chunk(finish="length") + chunk(choices=[], usage=USAGE) + DONE,
        ["Hi", Finished("length", USAGE)],
        "usage-chunk",
    ),
    Case(
        b": ping\n\n" + chunk("a") + b": ping\n\n" + DONE, ["a", Finished("stop", None)], "comments-no-finish"
    ),
    Case(chunk("a\nb") + chunk("") + DONE, ["a\nb", Finished("stop", None)], "empty-content-is-no-token"),
    Case(
        chunk("a") + b'event: error\ndata: {"error":{"code":"overloaded","message":"busy"}}\n\n' + chunk("b"),
        ["a", "error:(overloaded): busy"],
        "error-event",
    ),
    Case(
        chunk("a") + b'data: {"error":{"message":"oom","code":null}}\n\n',
        ["a", "error:(None): oom"],
        "error-in-data",
    ),
    Case(b'data: {"error":"boom"}\n\n', ["error:boom"], "error-not-an-object"),
    Case(chunk("a") + b"data: {oops\n\n", ["a", "error:not a JSON chunk"], "data-not-json"),
    Case(b"data: [1, 2]\n\n", ["error:not a JSON chunk"], "data-not-an-object"),
    Case(
        chunk("a") + chunk(finish="stop"), ["a", END_OF_BODY, Finished("stop", None)], "no-done-but-finished"
    ),
    Case(chunk("a"), ["a", END_OF_BODY, "error:ended before it finished"], "no-done-cut-short"),
    Case(b"", [END_OF_BODY, "error:ended before it finished"], "empty-body"),
    Case(DONE + chunk("late"), [Finished("stop", None)], "bytes-after-done-ignored"),
]


def decode(pieces: list[bytes]) -> list[Any]:
    decoder, out = ChunkDecoder(), []
    for piece in pieces:
        out += decoder.feed(piece)
    if not decoder.ended:
        out += [END_OF_BODY, decoder.end_of_body()]
    return [f"error:{item.message}" if isinstance(item, ModelError) else item for item in out]


def matches(got: list[Any], want: list[Any]) -> bool:
    """Equal, except that an error matches if its message has the words."""
    return len(got) == len(want) and all(
        g == w or (isinstance(w, str) and w.startswith("error:") and isinstance(g, str) and w[6:] in g)
        for g, w in zip(got, want, strict=True)
    )


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_case_whole(case: Case) -> None:
    assert matches(decode([case.body]), case.items), decode([case.body])


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_case_byte_by_byte(case: Case) -> None:
    assert matches(decode([case.body[i : i + 1] for i in range(len(case.body))]), case.items)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_case_every_split_point(case: Case) -> None:
    for at in range(len(case.body) + 1):
        assert matches(decode([case.body[:at], case.body[at:]]), case.items), at


def test_errors_are_upstream_errors() -> None:
    (item,) = ChunkDecoder().feed(b"data: {oops\n\n")
    assert isinstance(item, ModelError) and item.code == "upstream_error"


def test_the_upstreams_id_is_its_first_chunks() -> None:
    decoder = ChunkDecoder()
    decoder.feed(ROLE + chunk("a", id="chatcmpl-later"))
    assert decoder.upstream_id == "chatcmpl-up"


def test_an_endless_line_is_garbage() -> None:
    """No event in :data:`GARBAGE_BYTES`: the parser would keep the line forever."""
    decoder = ChunkDecoder()
    assert decoder.feed(b"x" * GARBAGE_BYTES) == []  # not one byte more
    (item,) = decoder.feed(b"x")
    assert isinstance(item, ModelError) and "without one event" in item.message
    assert decoder.ended and decoder.feed(DONE) == []


# -- before the stream: the status line and the content type -----------------
@pytest.mark.parametrize(
    ("status", "key_env", "code", "words"),
    [
        (401, "MY_KEY", "upstream_error", "refused our key, $MY_KEY (401: bad key)"),
        (403, None, "upstream_error", "no key (--upstream-key-env) (403: bad key)"),
        (429, "MY_KEY", "upstream_unavailable", "busy (429: bad key)"),
        (503, "MY_KEY", "upstream_unavailable", "busy (503: bad key)"),
        (400, "MY_KEY", "upstream_rejected", "rejected the request (400: bad key)"),
        (404, "MY_KEY", "upstream_rejected", "(404: bad key)"),
        (500, "MY_KEY", "upstream_error", "failed (500: bad key)"),
        (502, "MY_KEY", "upstream_error", "failed (502: bad key)"),
    ],
)
def test_refusal(status: int, key_env: str | None, code: str, words: str) -> None:
    err = refusal(status, b'{"error": {"message": "bad key", "code": "x"}}', key_env)
    assert err.code == code and words in err.message


def test_refusal_quotes_a_body_that_is_not_openai_shaped() -> None:
    err = refusal(502, b"<html>Bad Gateway</html>" + b"!" * 500, None)
    assert "(502: <html>Bad Gateway</html>!!!" in err.message and len(err.message) < 300


@pytest.mark.parametrize(
    ("content_type", "ok"),
    [
        ("text/event-stream", True),
        ("text/event-stream; charset=utf-8", True),
        ("text/html", False),
        ("", False),
    ],
)
def test_not_a_stream(content_type: str, ok: bool) -> None:
    err = not_a_stream(content_type)
    assert (err is None) == ok
    if err is not None:
        assert err.code == "upstream_error" and (content_type or "no content type") in err.message


# -- what we ask ---------------------------------------------------------------
def test_request_body_sends_only_what_the_client_set() -> None:
    plain = request_body(ModelRequest(messages=(("user", "hi"),), model="m"))
    assert plain == {
        "model": "m",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    full = request_body(
        ModelRequest(
            messages=(("system", "s"), ("user", "hi")),
            max_tokens=5,
            seed=3,
            stop=("\n",),
            temperature=0.0,
            simulate_sent={"tokens": 2},
        )
    )
    assert full["max_tokens"] == 5 and full["seed"] == 3 and full["stop"] == ["\n"]
    assert full["temperature"] == 0.0 and full["simulate"] == {"tokens": 2}


# -- properties -----------------------------------------------------------------
#: Bytes that mean something to the decoder, for the properties to combine.
FRAGMENTS = [
    ROLE,
    chunk("a"),
    chunk(finish="stop"),
    DONE,
    b": ping\n\n",
    b"data: {oops\n\n",
    b"\n",
    b"data: ",
]
BODIES = st.one_of(st.binary(max_size=300), st.lists(st.sampled_from(FRAGMENTS), max_size=8).map(b"".join))


@given(BODIES, st.lists(st.integers(0, 2000), max_size=4))
def test_any_bytes_give_tokens_then_one_ending_however_they_are_cut(body: bytes, points: list[int]) -> None:
    cuts = sorted({min(p, len(body)) for p in points})
    pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
    decoder, items = ChunkDecoder(), []
    for piece in pieces:
        items += decoder.feed(piece)  # never raises
    if not decoder.ended:
        items.append(decoder.end_of_body())
    *tokens, ending = items
    assert all(isinstance(t, str) for t in tokens) and isinstance(ending, (Finished, ModelError))
    assert decode(pieces) == decode([body])
