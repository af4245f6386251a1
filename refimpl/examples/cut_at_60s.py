"""A streaming route that forgets ``response.timeout = None``.  Broken.

Quart wraps the sending of every response in a timeout, its config value
``RESPONSE_TIMEOUT``, 60 seconds by default.  For an ordinary response that
is a guard against a stuck handler; for a token stream it is a time bomb:
at 60 s the body generator is cancelled mid-stream and the server closes the
connection.  No error event, no ``[DONE]``; on HTTP/1.1 the client sees a
chunked body that was never finished, which looks like a network fault.
Short answers never reach 60 s, so the bug survives every demo.

``create_app(fixed=False)`` builds the broken app, ``fixed=True`` the one
line repair that ``refimpl/protocols/sse_chat.py`` makes.  The route sends one
event per second for ``seconds`` seconds, then ``[DONE]``.  Lesson 02 and
``tests/test_lesson_examples.py`` run both under trio's ``MockClock``, so the
90 seconds take milliseconds.
"""

from __future__ import annotations

import trio
from quart import Response
from quart_trio import QuartTrio

from ..sse import encode


def create_app(*, fixed: bool) -> QuartTrio:
    app = QuartTrio(__name__)

    # region: ticker-route
    @app.get("/ticks/<int:seconds>")
    async def ticks(seconds: int) -> Response:
        async def body():
            for n in range(seconds):
                await trio.sleep(1)
                yield encode(str(n))
            yield encode("[DONE]")

        response = Response(body(), content_type="text/event-stream")
        if fixed:
            response.timeout = None  # the fix: no deadline on sending this body
        return response

    # endregion: ticker-route

    return app


def main(argv: list[str] | None = None) -> None:
    """``python -m refimpl.examples.cut_at_60s [--fixed] [PORT]`` (lesson 02)."""
    import argparse
    from functools import partial

    from ..app import serve

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("port", nargs="?", type=int, default=8001)
    parser.add_argument("--fixed", action="store_true", help="set response.timeout = None")
    args = parser.parse_args(argv)
    app = create_app(fixed=args.fixed)

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            url = await nursery.start(partial(serve, app, "127.0.0.1", args.port))
            print(f"{'fixed' if args.fixed else 'broken'}: curl -N {url}/ticks/61", flush=True)

    trio.run(run)


if __name__ == "__main__":
    main()
