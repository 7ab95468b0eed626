"""selfplay's Luigi entry module: `luigi --module pipeline Iterate --rounds 3`.

Importing it registers every task and sets up logging: the `selfplay` logger prints one line per
event, and errors a user caused (common.errors.SelfplayError) are logged as one line, not a traceback.
It also gives Luigi the package's own settings (LUIGI_DEFAULTS) wherever the user's configuration
has none, so the command behaves the same from any directory.
"""

import logging
import os

from common.errors import SelfplayError

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

# The settings of the shipped luigi.cfg. Luigi reads luigi.cfg from the working directory only (or
# /etc/luigi, or LUIGI_CONFIG_PATH): run from anywhere else, the command would wait for a remote
# scheduler and a failed run would exit 0. `luigi` imports --module before it reads [retcode] or
# builds its scheduler, so values set here at import time apply; an option the user's configuration
# sets is never overridden. (A central scheduler: set `[core] local_scheduler = false` there.)
LUIGI_DEFAULTS = {
    "core": {"local_scheduler": True, "log_level": "INFO"},
    "worker": {"check_complete_on_run": True, "keep_alive": False},
    "resources": {"gpu": 1},  # every task that holds the GPU asks for gpu=1: two never share it
    "retcode": {  # any failure exits non-zero
        "already_running": 10, "missing_data": 20, "not_run": 25, "task_failed": 30,
        "scheduling_error": 35, "unhandled_exception": 40,
    },
}


def _apply_luigi_defaults() -> None:
    import luigi.configuration
    from luigi.configuration import LuigiTomlParser

    config = luigi.configuration.get_config()
    typed = isinstance(config, LuigiTomlParser)  # TOML keeps values typed; the .cfg parser holds text
    for section, options in LUIGI_DEFAULTS.items():
        for option, value in options.items():
            if not config.has_option(section, option):
                text = str(value).lower() if isinstance(value, bool) else str(value)
                config.set(section, option, value if typed else text)


_apply_luigi_defaults()

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
