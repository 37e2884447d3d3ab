"""Worked examples run from the repository root (``python -m examples.demo``); not installed."""
