"""Command-line tools, one module each (see wadi.cli)."""
