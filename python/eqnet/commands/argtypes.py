"""argparse types for counts, so an out-of-range count is a usage error (exit 2) at parse
time, naming the option and the accepted range."""

from __future__ import annotations

import argparse


def count(low: int = 1):
    """An argparse `type`: an integer >= `low`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected an integer >= {low}, got {text!r}"
            ) from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse
