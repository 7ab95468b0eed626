"""selfplay's Luigi entry module: `luigi --module pipeline Iterate --rounds 3`.

Importing it registers every task with Luigi, and nothing else: the logging and Luigi settings every
task needs are set up by tasks/base.py, which each task module imports, so a task module imported on
its own behaves the same. Nothing of the project imports this module; it sits above tasks/.
"""

import tasks.base_model  # noqa: F401
import tasks.benchmark  # noqa: F401
import tasks.evaluate  # noqa: F401
import tasks.iterate  # noqa: F401
import tasks.report  # noqa: F401
import tasks.rounds  # noqa: F401
