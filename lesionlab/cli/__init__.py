"""`lesionlab` on the command line (see main.py)."""

from lesionlab.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
