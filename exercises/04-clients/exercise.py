"""Exercise 04: leave a stream early, and take the model with you (lesson 04).

``first_pieces(client, question, n)`` asks ``question`` through the openai
SDK's ``client`` (an ``openai.OpenAI`` pointed at a refimpl server), streams
the answer, and returns the text of its first ``n`` pieces of content, or
of every piece if the answer has fewer.  A caller that wants a preview, a
title or a yes/no from the first words of a long answer does just this.

Once you have your ``n`` pieces, nobody will read the rest, so the model
must stop: when ``first_pieces`` returns, the server's trace must end
``cancelled(client_disconnect)``, a few tokens after the ones you read,
not a million tokens later.

The ``client`` is the caller's and serves the next question too: leave it
open.  Lesson 04, "Stopping early" and "The broken version: ``break`` and
nothing else", says what ``break`` does and does not end.

What is here now reads the pieces right.  Run ``make exercise N=04``.
"""

from __future__ import annotations

import openai

MODEL = "refimpl-sim"


def first_pieces(client: openai.OpenAI, question: str, n: int) -> str:
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": question}], stream=True
    )
    parts: list[str] = []
    for chunk in stream:
        if chunk.choices and (piece := chunk.choices[0].delta.content):
            parts.append(piece)
            if len(parts) == n:
                break  # we have what we came for
    return "".join(parts)
