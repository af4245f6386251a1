"""Code the lessons show and run, that the server itself does not need.

Two kinds live here, and nothing in ``refimpl`` imports either:

* **Broken code, kept on purpose**: the "before" half of a lesson's
  broken/fixed pair (STYLE §4).  It exists, runs, and a test proves it
  breaks exactly the way the lesson says (``tests/test_lesson_examples.py``,
  ``test_websocket_seed.py``, ``test_zombie.py``; for JavaScript,
  ``tests/js/``).  Do not copy from it.

  ``naive_sse``     SSE readers that split on ``"\\n"`` (lesson 01)
  ``cut_at_60s``    a Quart stream that forgets ``response.timeout`` (lesson 02)
  ``seed_ws``       the seed's WebSocket loop, flaws and all (lesson 03)
  ``seed_fetch.mjs``  the seed's ``fetch()`` SSE reader, flaws and all (lesson 07)
  ``zombie``        the seed's SSE loop with the model in a background task
                    that nobody stops when the client leaves (lesson 09)

* **Small working programs** the lessons include by region, so what a
  lesson shows is what the tests run.

  ``timing``        TTFT and e2e of a full vs a streamed answer (lesson 00)
  ``sse_tour``      the SSE wire format as a table of bytes -> events (lesson 01)
  ``clients``       httpx-sse and the openai SDK reading our stream (lesson 02)
  ``curl_stream.sh``  the same with curl (lesson 02)
  ``client_streams``  every Python client people stream with, one function
                    each: ours, httpx-sse, openai (sync, async), LangChain,
                    LiteLLM (lesson 04)
  ``client_timelines``  when each of them hands over each piece, drawn
                    (notebook 04)
  ``client_fetch.mjs``  our browser ``fetch()`` reader without a page, the
                    fixed twin of ``seed_fetch.mjs`` (lesson 04)
  ``midstream_clients``  what openai, LangChain, LiteLLM, httpx-sse and a
                    naive reader each do with a mid-stream ``event: error``,
                    measured (lesson 07)
  ``nginx_proxy``   a real nginx in front of a server, for scripts, notebooks
                    and the command line (lesson 08)
  ``nginx.conf``    its config, tuned for token streams (lesson 08)
  ``slow_reader``   a client that reads slower than the model writes, at a
                    pace we set (lesson 10)
"""
