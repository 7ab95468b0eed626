"""selfplay's Luigi entry module: `luigi --module pipeline Iterate --rounds 3`.

Importing it registers every task with Luigi, and nothing else: the logging and Luigi settings every
task needs are set up by tasks/base.py, which each task module imports, so a task module imported on
its own behaves the same. Nothing of the project imports this module; it sits above tasks/.

At the command's exit every object is frozen out of the garbage collector before the interpreter tears
down: its last collections would otherwise walk the whole object graph of torch, transformers and peft
(on a loaded 2-core machine a plain script that imported them took 5.3 s to exit, 0.85 s frozen;
bench/README.md, "A whole round"). Every artifact is written and closed by then, and the other exit
handlers (the run directory's lock, logging) still run after this one; only the collection of reference
cycles at exit is skipped. SELFPLAY_GC_FREEZE_AT_EXIT=0 turns it off.
"""

import atexit
import gc
import os

import tasks.base_model  # noqa: F401
import tasks.benchmark  # noqa: F401
import tasks.evaluate  # noqa: F401
import tasks.iterate  # noqa: F401
import tasks.report  # noqa: F401
import tasks.rounds  # noqa: F401

# Registered after tasks/ registered theirs, so it runs first at exit and theirs still run after it.
if os.environ.get("SELFPLAY_GC_FREEZE_AT_EXIT", "1") != "0":
    atexit.register(gc.freeze)
