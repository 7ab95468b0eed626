"""selfplay's Luigi entry module: `luigi --module pipeline Iterate --rounds 3`.

Importing it registers every task and sets up logging: the `selfplay` logger prints one line per
event, and errors a user caused (pipeline.errors.SelfplayError) are logged as one line, not a traceback.
"""

import logging
import os

from pipeline.errors import SelfplayError

# transformers draws a progress bar for every weight load; a round loads several models.
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


class _OneLineUserErrors(logging.Filter):
    """Luigi logs task failures with their traceback; for a user's mistake the message is enough."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], SelfplayError):
            record.msg = f"{record.getMessage()}: selfplay: {record.exc_info[1]}"
            record.args = ()
            record.exc_info = None
            record.exc_text = None
        return True


def _setup_logging() -> None:
    logging.getLogger("luigi-interface").addFilter(_OneLineUserErrors())
    log = logging.getLogger("selfplay")
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("selfplay: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


_setup_logging()

# Importing the task modules registers their tasks with Luigi. A task module imports pipeline.base (and
# so this file) first; to keep any import order free of cycles, task modules import each other's
# classes inside requires(), never at module level.
import tasks.base_model  # noqa: E402,F401
import tasks.evaluate  # noqa: E402,F401
import tasks.generate  # noqa: E402,F401
import tasks.iterate  # noqa: E402,F401
import tasks.judge  # noqa: E402,F401
import tasks.report  # noqa: E402,F401
import tasks.train  # noqa: E402,F401
