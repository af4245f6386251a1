"""Broken code, kept on purpose: the "before" half of the lessons' pairs.

STYLE §4: where a lesson teaches a pitfall, the broken code exists, runs, and
``tests/test_lesson_examples.py`` proves it breaks exactly the way the lesson
says.  Nothing in ``refimpl`` imports this package; do not copy from it.

``naive_sse``     SSE readers that split on ``"\\n"`` (lesson 01)
``cut_at_60s``    a Quart stream that forgets ``response.timeout`` (lesson 02)
"""
