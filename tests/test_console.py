"""What a command prints: no deprecation warning our calls trigger, library lines that say nothing to the user
silenced by name (and only those), progress bars that draw whole lines in a log file."""

import logging
import subprocess
import sys
import traceback
import warnings
from pathlib import Path

import luigi

import pipeline  # noqa: F401 - registers the tasks
from common.quiet import BITSANDBYTES_CPU_LOGGER, quiet_library_noise
from tasks.iterate import Iterate
from conftest import REPO

LIBRARIES = ("site-packages", "/lib/python3")  # third-party and standard-library frames
# Libraries whose deprecation warnings can only be about the arguments a caller passes them: a warning of
# theirs whose nearest frame outside them is ours was caused by our call.
CALLED_BY_US = ("/transformers/", "/torch/")


def _caused_by_our_code(stack: list[traceback.FrameSummary]) -> bool:
    """Walking out from the warning: only transformers/torch frames, then a frame of this repository."""
    for frame in reversed(stack):
        if not any(part in frame.filename for part in LIBRARIES):
            return frame.filename.startswith(str(REPO))
        if not any(part in frame.filename for part in CALLED_BY_US):
            return False  # another library (peft, luigi, ...) made the call that warns
    return False


def test_a_stage_run_raises_no_deprecation_warning_from_our_code(tiny_recipe, tmp_path, monkeypatch, caplog):
    recorded = []
    real_warn = warnings.warn

    def warn(message, category=None, stacklevel=1, source=None, **kwargs):
        category = category or (message.__class__ if isinstance(message, Warning) else UserWarning)
        if issubclass(category, (DeprecationWarning, PendingDeprecationWarning, FutureWarning)):
            recorded.append((str(message), traceback.extract_stack()[:-1]))
        return real_warn(message, category, stacklevel + 1, source, **kwargs)

    monkeypatch.setattr(warnings, "warn", warn)
    recipe = tiny_recipe("spin", demo_model={"sft_steps": 10}, generation={"backend": "static"})
    with caplog.at_level(logging.WARNING, logger="transformers"):
        assert luigi.build([Iterate(recipe=recipe, runs_dir=str(tmp_path / "runs"), rounds=1)], local_scheduler=True,
                           log_level="WARNING")
    ours = [message for message, stack in recorded if _caused_by_our_code(stack)]
    assert ours == []
    # transformers also says some deprecations through its logger, once per process ("past_key_values ... deprecated").
    assert [r.getMessage() for r in caplog.records if "deprecat" in r.getMessage().lower()] == []


def test_the_heuristic_finds_our_deprecated_call():
    """The test above can fail: a deprecated transformers argument passed from here is attributed to us."""
    import torch
    from transformers import LlamaConfig, LlamaModel

    model = LlamaModel(LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=1))
    recorded = []
    real_warn = warnings.warn

    def warn(message, category=None, stacklevel=1, source=None, **kwargs):
        recorded.append((str(message), traceback.extract_stack()[:-1]))

    warnings.warn = warn
    try:
        model(input_ids=torch.tensor([[1, 2]]), past_key_values=None, use_cache=False)
    finally:
        warnings.warn = real_warn
    assert any("past_key_values" in m and _caused_by_our_code(s) for m, s in recorded), [m for m, _ in recorded]


def test_library_lines_silenced_by_name_and_only_those(caplog):
    quiet_library_noise()
    noisy = logging.getLogger(BITSANDBYTES_CPU_LOGGER)
    with caplog.at_level(logging.WARNING, logger=BITSANDBYTES_CPU_LOGGER):
        noisy.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure ...", "offline")
        noisy.warning("something else about 4-bit weights")
    assert [r.getMessage() for r in caplog.records] == ["something else about 4-bit weights"]
    with warnings.catch_warnings(record=True) as caught:
        quiet_library_noise()
        warnings.warn_explicit("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning,
                               "modeling_utils.py", 1, module="transformers.modeling_utils")
        warnings.warn_explicit("`other` is deprecated", FutureWarning, "modeling_utils.py", 1, module="transformers.modeling_utils")
    assert [str(w.message) for w in caught] == ["`other` is deprecated"]


BARS_TO_A_FILE = """
import logging, sys, time
from common.progress import bar
logging.basicConfig(format="selfplay: %(message)s", level=logging.INFO)
progress = bar(total=3, desc="train round 1", mininterval=0)
for _ in range(3):
    progress.update(1)
progress.close()
logging.info("Train done in 1.0s -> runs/x/round_01/checkpoint")
"""


def test_progress_bars_in_a_log_file_leave_every_log_line_at_the_start_of_a_line(tmp_path):
    log = tmp_path / "run.log"
    with open(log, "w") as out:
        subprocess.run([sys.executable, "-c", BARS_TO_A_FILE], cwd=REPO, stdout=out, stderr=subprocess.STDOUT, check=True,
                       env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    text = Path(log).read_text()
    assert "\r" not in text
    lines = text.splitlines()
    assert lines[-1] == "selfplay: Train done in 1.0s -> runs/x/round_01/checkpoint"  # grep '^selfplay' finds it
    assert lines[0].startswith("train round 1:") and any("3/3" in line for line in lines[:-1])
