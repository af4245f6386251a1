"""The ``/v1/ws/chat`` message schema (DESIGN §2): what clients send, what we send.

Strategy
--------
Pure functions, no I/O, so the schema can be read (and tested) on its own,
the way ``refimpl/sse/`` is.  ``websocket_chat.py`` is the thin shell that
moves these messages over the socket.

Every message is one JSON object in one *text* frame (RFC 6455 §5.6), told
apart by ``"type"``.  Client → server:

``{"type": "chat", "messages": [...], "max_tokens": n, "simulate": {...}, "backpressure": "pause"}``
    start a generation (``backpressure`` is optional, lesson 10); ``messages`` and ``simulate`` are validated by the
    same code as the HTTP endpoint (``chat_request.py``), so a bad value gets
    the same error text and ``param`` on every protocol.
``{"type": "cancel"}``
    stop the running generation.  With none running it is ignored: a cancel
    that crosses the ``done`` on the wire is a race, not a mistake.

Server → client: ``token`` (``content``), then exactly one of ``done``
(``finish_reason``, ``usage``), ``cancelled`` (``usage``) or ``error``
(``error``: the OpenAI error object; that message is built in
``patterns/errors.py``, beside the SSE error event).  Two fields
extend DESIGN §2: ``id`` on those last three (the generation id, for
``GET /v1/debug/generations/{id}``) and ``reason`` on ``cancelled``
(``client_cancel``, ``shutdown``...).  When the model is ahead of the
socket, one ``token`` message carries every token that is ready (at most
``batch_tokens``), so count tokens with ``usage``, not with messages.

What goes wrong is sorted in two (DESIGN §2): a *bad message* raises
:class:`~refimpl.patterns.errors.APIError` and is answered with an ``error``
message, the socket stays usable; a *protocol violation* raises
:class:`ProtocolViolation`, and the socket is closed with the RFC 6455
§7.4.1 code: 1003 for a binary frame (we accept only text).  The 1009 for an
oversized message is sent by hypercorn before the message reaches us
(``hypercorn_patches.py``); 1008 is kept for authentication (DESIGN §2).
"""

from __future__ import annotations

from dataclasses import dataclass
from json.encoder import encode_basestring_ascii as json_string
from typing import TYPE_CHECKING, Any

from wsproto.frame_protocol import CloseReason

from ..backend import ModelRequest, Simulate
from ..jsonwire import dumps_ascii, loads_strict
from .chat_request import bad_request, optional_int, parse_backpressure, parse_messages, parse_simulate

if TYPE_CHECKING:  # a type only: importing the engine would bring in trio
    from ..engine import Generation


@dataclass(frozen=True, slots=True)
class Chat:
    request: ModelRequest
    backpressure: str | None = None  # None: the server's --backpressure


@dataclass(frozen=True, slots=True)
class Cancel:
    pass


class ProtocolViolation(Exception):
    """The client broke the protocol, not just a message: close with ``code``."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


# The fields each message type may carry; anything else is a typo worth an error.
_FIELDS = {"chat": {"type", "messages", "max_tokens", "simulate", "backpressure"}, "cancel": {"type"}}


def _decode(text: str) -> Any:
    return loads_strict(text, "the message")


# region: parse-client-message
def parse_client_message(data: str | bytes | None, *, model: str, defaults: Simulate) -> Chat | Cancel:
    """One received message, validated; raises APIError or ProtocolViolation."""
    if not isinstance(data, str):  # bytes; Quart gives None for an empty binary frame
        raise ProtocolViolation(CloseReason.UNSUPPORTED_DATA, "binary frames are not accepted")
    body = _decode(data)
    if not isinstance(body, dict):
        raise bad_request("A message must be a JSON object.", None, "invalid_json")
    kind = body.get("type")
    if kind is None:
        raise bad_request(
            "A message needs a 'type': 'chat' or 'cancel'.", "type", "missing_required_parameter"
        )
    if not isinstance(kind, str) or kind not in _FIELDS:
        raise bad_request(
            f"Unknown message type {kind!r}; send 'chat' or 'cancel'.", "type", "unknown_message_type"
        )
    if unknown := sorted(set(body) - _FIELDS[kind]):
        raise bad_request(
            f"Unknown field '{unknown[0]}' in a '{kind}' message.", unknown[0], "unknown_parameter"
        )
    if kind == "cancel":
        return Cancel()
    max_tokens = optional_int(body, "max_tokens", 1)
    return Chat(
        ModelRequest(
            messages=parse_messages(body.get("messages")),
            model=model,
            max_tokens=max_tokens,
            simulate=parse_simulate(body.get("simulate"), defaults),
            simulate_sent=body.get("simulate") or None,  # a proxy passes it on (upstream.py)
        ),
        parse_backpressure(body.get("backpressure")),
    )


# endregion: parse-client-message


# region: server-messages
# ASCII escapes everywhere: a text frame must be valid UTF-8 (RFC 6455 §5.6),
# and a lone surrogate -- JSON allows "\ud800", and error messages quote what
# the client sent -- cannot be encoded as UTF-8, only escaped.
_TOKEN = '{"type":"token","content":'


def token_message(tokens: list[str]) -> str:
    """Pre-encoded: the hot path costs one C-level string escape per message."""
    return _TOKEN + json_string("".join(tokens)) + "}"


def done_message(gen: Generation) -> str:
    return dumps_ascii(
        {"type": "done", "id": gen.id, "finish_reason": gen.finish_reason, "usage": gen.usage()}
    )


def cancelled_message(gen: Generation, reason: str) -> str:
    return dumps_ascii({"type": "cancelled", "id": gen.id, "reason": reason, "usage": gen.usage()})


# endregion: server-messages
