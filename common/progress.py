"""tqdm bars that stay readable in log files: redrawn at most every 30 s when not on a terminal."""

import sys

from tqdm.auto import tqdm


def bar(iterable=None, **kwargs):
    kwargs.setdefault("mininterval", 0.5 if sys.stderr.isatty() else 30)
    kwargs.setdefault("leave", False)
    return tqdm(iterable, **kwargs)
