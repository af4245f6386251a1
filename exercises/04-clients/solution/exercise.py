"""Exercise 04, a solution: leave a stream early, and take the model with you.

The task is in ``../exercise.py``.  ``break`` ends the loop, not the
response: the openai ``Stream`` keeps its HTTP response open until someone
calls ``close()``, and since the stream and its iterator refer to each
other, dropping the last name of it does not close it either; only the
garbage collector's cycle pass does, at a moment of its own choosing
(lesson 04, "The broken version: ``break`` and nothing else").  A ``with``
around the stream closes it on every way out of the block: the ``break``,
the end of the answer, an exception.  The server reads the closed
connection as the client leaving and cancels the model (lesson 09).  The
client stays open for the caller's next question.
"""

from __future__ import annotations

import openai

MODEL = "refimpl-sim"


def first_pieces(client: openai.OpenAI, question: str, n: int) -> str:
    parts: list[str] = []
    with client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": question}], stream=True
    ) as stream:  # leaving the `with` closes the response
        for chunk in stream:
            if chunk.choices and (piece := chunk.choices[0].delta.content):
                parts.append(piece)
                if len(parts) == n:
                    break
    return "".join(parts)
