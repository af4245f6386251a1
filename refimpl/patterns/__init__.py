"""Patterns for the hard parts of streaming, one module each (lessons 07-11)."""
