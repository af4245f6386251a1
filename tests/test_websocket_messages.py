"""The WebSocket message schema on its own (``protocols/ws_messages.py``).

The parser is pure, so besides the table of bad messages that
``test_websocket.py`` sends over a real socket, Hypothesis can throw anything
at it: whatever a client sends, the answer is a parsed message, an
``APIError`` (an error message, the socket stays usable) or a
``ProtocolViolation`` (a close code) -- never another exception, which would
be a traceback and a dead socket.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from refimpl.model import ModelError, Simulate
from refimpl.patterns.errors import APIError
from refimpl.patterns.errors import ws_error_message as error_message
from refimpl.protocols.ws_messages import (
    Cancel,
    Chat,
    ProtocolViolation,
    parse_client_message,
    token_message,
)

DEFAULTS = Simulate()


def parse(data):
    return parse_client_message(data, model="refimpl-sim", defaults=DEFAULTS)


def test_chat_and_cancel():
    message = parse(
        '{"type":"chat","messages":[{"role":"user","content":"hi"}],"max_tokens":3,"simulate":{"tokens":5}}'
    )
    assert isinstance(message, Chat)
    assert message.request.messages == (("user", "hi"),)
    assert message.request.max_tokens == 3 and message.request.simulate.tokens == 5
    assert message.request.model == "refimpl-sim"
    assert parse('{"type":"cancel"}') == Cancel()


@pytest.mark.parametrize("data", [b"", b"\x00", None])
def test_anything_but_text_is_a_protocol_violation(data):
    with pytest.raises(ProtocolViolation) as violation:
        parse(data)
    assert violation.value.code == 1003


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=20,
)
# Objects that look like our messages, so the deeper checks get exercised too.
near_messages = st.fixed_dictionaries(
    {"type": st.sampled_from(["chat", "cancel", "CHAT", ""]) | json_values},
    optional={
        "messages": json_values
        | st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "bot"]), "content": json_values})),
        "max_tokens": json_values,
        "simulate": json_values
        | st.dictionaries(st.sampled_from(["tokens", "itl_ms", "seed", "fail_with", "x"]), json_values),
    },
)


@given(st.text() | json_values.map(json.dumps) | near_messages.map(json.dumps))
@example('{"type":"chat","messages":[{"role":"user","content":"x"}],"simulate":{"tokens":NaN}}')
@example('{"type":"chat","messages":[{"role":"user","content":"x"}],"simulate":{"tokens":1e400}}')
@example("[" * 10_000)
@example('{"type": []}')
@example('{"type":"chat","messages":[{"role":"user","content":"x"}],"max_tokens":true}')
def test_any_text_parses_or_is_a_clear_error(text):
    try:
        parse(text)
    except APIError as err:  # becomes {"type":"error", ...}
        assert err.status == 400 and err.code and err.message
        json.loads(error_message(err))


any_text = st.text(alphabet=st.characters(codec=None, categories=None))  # lone surrogates too


@given(st.lists(any_text, max_size=5))
def test_token_message_is_json_with_the_joined_content(tokens):
    message = token_message(tokens)
    message.encode()  # a text frame must be UTF-8, whatever the model wrote
    assert json.loads(message) == {"type": "token", "content": "".join(tokens)}


@given(any_text, any_text)
def test_error_messages_are_always_utf8(message, param):
    text = error_message(APIError(400, message, code="x", param=param))
    text.encode()
    assert json.loads(text)["error"]["param"] == param


def test_error_message_shapes():
    bad = json.loads(error_message(APIError(400, "nope", code="invalid_json")))
    assert bad == {
        "type": "error",
        "error": {"message": "nope", "type": "invalid_request_error", "param": None, "code": "invalid_json"},
    }
    failed = json.loads(error_message(ModelError("overloaded"), "chatcmpl-1"))
    assert failed["id"] == "chatcmpl-1" and failed["error"]["type"] == "server_error"
    assert failed["error"]["code"] == "overloaded"
