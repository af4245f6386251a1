"""Errors: one shape everywhere, and how each protocol says "this failed".

Strategy
--------
OpenAI's API reports every failure as ``{"error": {"message", "type",
"param", "code"}}`` and its SDKs turn that body into typed exceptions.  We use
the same shape on every protocol, before and after a stream starts, so one
client-side handler fits all (STYLE §11).  Lesson 07 teaches this module.

**Before the first byte** the HTTP status line is still ours to choose, and it
is the part clients *act* on: the openai SDKs (Python and Node, and so
LangChain on top of them) retry 408, 409, 429 and every 5xx twice by default,
waiting for ``retry-after-ms`` / ``Retry-After`` when the server sends one;
they never retry any other 4xx.  So the status must say whether trying again
can help (RFC 9110 §15.5-15.6: 4xx is the caller's problem, 5xx ours;
§10.2.3 for ``Retry-After``).  :class:`APIError` carries it, and ``app.py``
turns it into the response.

**After the first byte** (a stream's 200 is on the wire) no status can be
sent any more.  The failure travels *in* the stream instead, with the same
error object, and each protocol has one obvious way to say it (see
:func:`sse_error_event` and :func:`ws_error_message`, side by side below):

* SSE: ``event: error`` and ``data: {"error": ...}``, then the body ends
  cleanly *without* ``data: [DONE]``.  A client that waits for ``[DONE]``
  can never mistake the failed stream for a finished one; the openai SDK
  raises ``APIError`` on the event.
* WebSocket: a ``{"type": "error", "id": ..., "error": ...}`` message, and the
  socket stays open for the next turn (the failure was the answer's, not the
  connection's).
* gRPC: the call ends with a status code (``grpc-status``) chosen from the
  HTTP status the same failure would get (Connect's table of codes and HTTP
  statuses, read backwards), a message that starts with the OpenAI code, and
  a ``google.rpc.ErrorInfo`` detail (``reason`` = the code, ``metadata`` =
  type and param) that ``grpcio-status`` decodes.  Before the stream or in the
  middle of it alike: gRPC's status always comes last, in the trailers.

**The failures a model can have**, and the status each gets when it is still
possible to send one (a non-streamed request).  ``FAILURES`` is the table;
lesson 07 shows what the openai SDK does with each, measured
(``tests/test_error_statuses.py`` counts the generations a call made):

==================  ======  =====================  ============================
code                status  type                   the SDK ...
==================  ======  =====================  ============================
``overloaded``      503     server_error           retries after ``Retry-After``
``timeout``         504     server_error           retries (a slow model may
                                                   finish next time)
``internal_error``  500     server_error           retries (a bug of ours)
``model_error``     500     server_error           retries
``content_filter``  400     invalid_request_error  does not retry: the same
                                                   prompt fails the same way
==================  ======  =====================  ============================

``timeout`` comes from the engine (``--generation-timeout``), and
``internal_error`` from an exception that is not a
:class:`~refimpl.backend.ModelError` at all -- a bug in a backend, logged with
its traceback by :func:`from_bug`.  Every other failure is expected: the log
gets one line naming the generation (:func:`log_failure`), no traceback.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

from ..backend import ModelError
from ..jsonwire import dumps, dumps_ascii
from ..sse import encode

if TYPE_CHECKING:  # connectrpc pulls in sockets: the sans-IO modules that import us must not
    from connectrpc.errors import ConnectError

log = logging.getLogger("refimpl")

# The OpenAI ``type`` string for each status of an error before the stream.
_STATUS_TYPE = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    499: "invalid_request_error",  # nginx's "client closed request"; Connect's "canceled"
    500: "server_error",
    502: "server_error",
    503: "server_error",
    504: "server_error",
}

# region: failure-table
#: code -> (HTTP status, whether to send Retry-After); see the table above.
FAILURES: dict[str, tuple[int, bool]] = {
    "overloaded": (503, True),
    "timeout": (504, False),
    "internal_error": (500, False),
    "model_error": (500, False),
    "content_filter": (400, False),
    "server_shutdown": (503, True),  # the server ended it (shutdown.py), not the model
    # The client read too slowly (backpressure.py, policy "disconnect"); only
    # ever mid-stream, so the status only picks the error's type.
    "slow_consumer": (408, False),
    # A resumable stream (resume.py, lesson 11); only ever mid-stream too.
    # Its replay log reached --resume-max-events: ask for less.
    "resume_log_full": (400, False),
    # The shared store (Redis) failed: the stream cannot be logged or followed.
    "store_unavailable": (503, True),
    # The process that ran the generation died; nobody will finish it.
    "generation_lost": (503, True),
    # Cancelled by its client (POST .../{id}/cancel) or, resumable, left
    # unread past --resume-grace: seen only by another reader of the stream.
    "client_cancel": (499, False),
    "client_disconnect": (499, False),
    # A real model upstream (upstream.py, lesson 14), as a gateway reports
    # it (RFC 9110 §15.6.3-15.6.5): it cannot be reached or says it is busy
    # (429/503), so trying again later can help ...
    "upstream_unavailable": (503, True),
    # ... it sent nothing for --upstream-timeout seconds ...
    "upstream_timeout": (504, False),
    # ... it failed, refused our key, or sent a broken or garbled stream ...
    "upstream_error": (502, False),
    # ... or it rejected the request itself (its 4xx): the same request
    # would fail the same way, so the SDK must not retry it.
    "upstream_rejected": (400, False),
}
# endregion: failure-table


# region: error-body
def error_body(message: str, type: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    """The OpenAI error object, ready for ``json.dumps``."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# endregion: error-body


class APIError(Exception):
    """A failure to report with an HTTP status, before any byte of a stream."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        type: str | None = None,
        retry_after: float | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.type = type or _STATUS_TYPE.get(status, "server_error")
        self.retry_after = retry_after  # seconds; sent as Retry-After
        self._headers = headers or {}  # e.g. X-Request-Id of the failed generation

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.code, self.param)

    def headers(self) -> dict[str, str]:
        """The response headers: any given, plus ``Retry-After`` in whole
        seconds (RFC 9110 §10.2.3) and OpenAI's ``retry-after-ms``, which its
        SDKs read first, for finer waits."""
        if self.retry_after is None:
            return self._headers
        return {
            **self._headers,
            "Retry-After": str(math.ceil(self.retry_after)),
            "retry-after-ms": str(round(self.retry_after * 1000)),
        }


# region: failure-status
def failure_status(err: ModelError, retry_after: float, headers: dict[str, str]) -> APIError:
    """A model failure, for a response that has not started yet (non-streamed)."""
    status, retry = FAILURES.get(err.code, (500, False))
    wait = retry_after if retry else None
    return APIError(status, err.message, code=err.code, retry_after=wait, headers=headers)


# endregion: failure-status


def request_timeout(part: str, seconds: float, *, close: bool = False) -> APIError:
    """408 for a request whose ``part`` ("headers" or "body") did not arrive
    within ``seconds`` (``--header-timeout`` / ``--body-timeout``): the
    client's fault, so ``invalid_request_error``; the openai SDK retries it.
    One message for both places that send it: ``hypercorn_limits.py``
    (HTTP/1.1) and ``app.py`` (Quart's body timeout).  ``close``: the
    connection closes after it, and HTTP/1.1 says so (RFC 9112 §9.6)."""
    message = f"The request {part} did not arrive within {seconds:g} seconds; the server stopped waiting."
    return APIError(408, message, code="request_timeout", headers={"Connection": "close"} if close else None)


def model_failure_body(err: ModelError) -> dict[str, Any]:
    """The error object of a failure after the stream started."""
    status, _ = FAILURES.get(err.code, (500, False))
    return error_body(err.message, _STATUS_TYPE.get(status, "server_error"), err.code)


# region: mid-stream-error
def sse_error_event(err: ModelError) -> bytes:
    """SSE: one ``event: error``; the caller then ends the body, no [DONE]."""
    return encode(dumps(model_failure_body(err)), event="error")


def ws_error_message(err: ModelError | APIError, gen_id: str | None = None) -> str:
    """WebSocket: one ``error`` message; the socket stays open.  Also used for
    a bad client message (an :class:`APIError`), which has no generation.
    ASCII escapes: a text frame must be valid UTF-8 (RFC 6455 §5.6), and an
    error may quote a lone surrogate the client sent."""
    return dumps_ascii({"type": "error", **({"id": gen_id} if gen_id else {}), "error": error_object(err)})


# endregion: mid-stream-error


# region: grpc-status
def error_object(err: ModelError | APIError) -> dict[str, Any]:
    """The OpenAI error object of ``err``, wherever it happened."""
    return (err.body() if isinstance(err, APIError) else model_failure_body(err))["error"]


#: HTTP status -> gRPC status code (Connect's mapping, read backwards).
_GRPC_CODE = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    404: "NOT_FOUND",
    408: "DEADLINE_EXCEEDED",
    413: "RESOURCE_EXHAUSTED",
    429: "RESOURCE_EXHAUSTED",
    499: "CANCELED",  # connectrpc spells it the Connect way; grpcio: CANCELLED
    502: "UNAVAILABLE",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}


def grpc_error(err: ModelError | APIError, gen_id: str | None = None) -> ConnectError:
    """gRPC: a status for the trailers; the handler raises it and the call ends."""
    from connectrpc.code import Code
    from connectrpc.errors import ConnectError, ErrorDetail
    from google.rpc import error_details_pb2
    from protobuf.wkt import Any as AnyDetail

    status = err.status if isinstance(err, APIError) else FAILURES.get(err.code, (500, False))[0]
    fields = error_object(err)
    metadata = {"type": fields["type"], **({"param": fields["param"]} if fields["param"] else {})}
    info = error_details_pb2.ErrorInfo(reason=fields["code"] or "", domain="refimpl", metadata=metadata)
    any_info = AnyDetail(type_url="type.googleapis.com/google.rpc.ErrorInfo", value=info.SerializeToString())
    message = f"{fields['code']}: {fields['message']}" if fields["code"] else fields["message"]
    if gen_id:
        message += f" (generation {gen_id})"
    # A client too slow to keep up: a resource the server ran out of, not a
    # deadline (a gRPC client reads DEADLINE_EXCEEDED as its own deadline).
    name = "RESOURCE_EXHAUSTED" if fields["code"] == "slow_consumer" else _GRPC_CODE.get(status, "INTERNAL")
    code = Code[name]
    return ConnectError(code, message, details=[ErrorDetail(any_info)])


# endregion: grpc-status


def cancelled_error(reason: str) -> ModelError:
    """A generation the *server* cancelled (at shutdown, ``shutdown.py``)
    while a client still reads: to that client it is a failure like any
    other, with a code that says whose doing it was."""
    if reason == "shutdown":
        return ModelError("server_shutdown", "The server is shutting down; the generation was stopped.")
    why = {
        "client_cancel": "a client asked for it (POST /v1/chat/completions/{id}/cancel)",
        "client_disconnect": "its client left and no reader came back within --resume-grace seconds",
    }.get(reason, reason)
    return ModelError(reason, f"The generation was cancelled: {why}.")


# region: bugs-and-logs
def from_bug(exc: Exception, gen_id: str) -> ModelError:
    """Something that is not a ModelError was raised while generating (in a
    backend, or in a writer): a bug.  Log it with its traceback (someone must
    fix it) and tell the client only that we failed; the exception text may
    hold internals it must not see."""
    log.error("generation %s: %s raised while generating", gen_id, type(exc).__name__, exc_info=exc)
    return ModelError("internal_error", "The server had an error while generating the response.")


def log_failure(gen_id: str, code: str, tokens: int) -> None:
    """One line per expected failure: which generation, why, how far it got."""
    log.warning("generation %s failed after %d tokens: %s", gen_id, tokens, code)


# endregion: bugs-and-logs
