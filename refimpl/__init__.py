"""refimpl: a reference implementation of LLM token streaming (see README.md)."""

__version__ = "0.1.0"
