"""refimpl: a reference implementation of LLM token streaming (see README.md)."""

__version__ = "0.1.0"

import logging as _logging

# A library stays quiet unless its user configures logging: without this,
# Python's last-resort handler would print our warnings (a failed generation)
# into whatever runs us -- a notebook cell, a test's output.  `refimpl serve`
# adds its own handler (cli.py).
_logging.getLogger("refimpl").addHandler(_logging.NullHandler())
