"""JSON over plain HTTP: read a request body strictly, answer with a JSON body.

Strategy
--------
Every HTTP route that is not a stream -- the non-streamed chat answer,
``/v1/models``, a trace, every error before a stream -- reads or writes one
JSON document.  Both directions are decided here once, on top of
``jsonwire.py`` (which does no I/O):

* :func:`read_json_body` insists on ``Content-Type: application/json`` (415
  otherwise, as OpenAI does) and decodes strictly: anything that is not RFC
  8259 JSON is a 400 ``invalid_json`` in the OpenAI error shape.
* :func:`json_response` writes ASCII-escaped JSON, since a body may echo the
  client's own strings, lone surrogates included (``jsonwire.dumps_ascii``).
"""

from __future__ import annotations

from typing import Any

from quart import Response, request

from ..jsonwire import dumps_ascii, loads_strict
from ..patterns.errors import APIError


async def read_json_body() -> Any:
    """The request's JSON, strictly (``jsonwire.loads_strict``)."""
    if request.mimetype != "application/json":
        raise APIError(415, "Content-Type must be application/json.", code="unsupported_media_type")
    return loads_strict(await request.get_data())


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """A plain JSON response: ASCII-escaped (see above)."""
    return Response(dumps_ascii(body), status, headers, content_type="application/json")
