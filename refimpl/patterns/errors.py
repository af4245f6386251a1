"""One error shape for every protocol, before and after the stream starts.

Strategy
--------
OpenAI's API reports every failure as ``{"error": {"message", "type",
"param", "code"}}``, and its SDKs turn that body into typed exceptions.  We
use the same shape everywhere so that one client-side handler fits all
(STYLE §11, "errors are part of the interface"):

* **Before the stream starts** the HTTP status carries the class of failure
  (400 bad request, 401, 404, 405, 413, 415, 429, 503) and the body carries
  the shape.  :class:`APIError` is raised anywhere in request handling and the
  app turns it into that response (``app.py``).
* **After the stream started** the status line (200) is already on the wire
  and cannot be taken back.  The SSE stream then sends the same shape as an
  ``event: error`` and ends *without* ``data: [DONE]``, so no client mistakes
  a failed stream for a finished one (lesson 07).  The WebSocket sends it as
  ``{"type": "error", "error": {...}}``.

``type`` follows OpenAI's vocabulary: ``invalid_request_error`` for the
caller's mistakes, ``server_error`` for ours.
"""

from __future__ import annotations

from typing import Any

# The status code each error type maps to, and the OpenAI ``type`` string.
_STATUS_TYPE = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}


# region: error-body
def error_body(
    message: str, type: str, code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    """The OpenAI error object, ready for ``json.dumps``."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}
# endregion: error-body


class APIError(Exception):
    """A failure to report with an HTTP status before any byte of a stream."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        type: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.type = type or _STATUS_TYPE.get(status, "server_error")

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.code, self.param)
