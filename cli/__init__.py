"""The ``fundus-edge`` command line: one module per command group, one formatting module (the only place that
prints)."""

from .main import main, make_parser

__all__ = ["main", "make_parser"]
