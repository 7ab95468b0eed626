"""tqdm bars that stay readable in log files: redrawn at most every 30 s when not on a terminal, each
drawing a line of its own.

On a terminal a bar redraws itself in place with carriage returns. Written to a file, those carriage
returns would glue the next log line onto the bar's last drawing (`grep '^selfplay' run.log` would miss
it), so there each drawing ends with a newline instead and the bar's final erasing is dropped.
"""

import sys

from tqdm.auto import tqdm


class _Lines:
    """A stream for tqdm off a terminal: every redraw becomes one line of stderr, blank erasures vanish."""

    encoding = "utf-8"

    def write(self, text: str) -> int:
        for drawing in text.split("\r"):
            drawing = drawing.rstrip()
            if drawing:
                sys.stderr.write(drawing + "\n")
        return len(text)

    def flush(self) -> None:
        sys.stderr.flush()

    def isatty(self) -> bool:
        return False


def bar(iterable=None, **kwargs):
    on_terminal = sys.stderr.isatty()
    kwargs.setdefault("mininterval", 0.5 if on_terminal else 30)
    kwargs.setdefault("leave", False)
    if not on_terminal:
        kwargs.setdefault("file", _Lines())
    return tqdm(iterable, **kwargs)
