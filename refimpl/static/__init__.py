"""The demo page and its ES-module JavaScript client (no build step)."""
