"""Library messages that say nothing to the user of a run, silenced one by one by their exact text.

Each entry names the library, the message and why it does not concern the user; every other warning
(ours, or a library's about the user's settings) is still shown. Installed when tasks/base.py is imported
(every command) and by `python -m models.train.trainer` (training under accelerate launch).

- bitsandbytes, on a CPU with AVX512-BF16, tries to fetch an optional faster 4-bit matmul from the
  Hugging Face hub when peft imports it (every run, fp32 ones included) and logs "Failed to load CPU
  gemm_4bit_forward from kernels-community" when it cannot (no hub, or no `kernels` package). It then
  uses its own CPU kernel: QLoRA works the same, only without that optional speed-up.
- peft asks every model it wraps for `is_gradient_checkpointing`, which transformers 5.24 renamed
  (`is_activation_checkpointing`) and warns about on each access: one FutureWarning per LoRA model
  loaded, about peft's code, not ours (our own code uses the new name).
"""

from __future__ import annotations

import logging
import warnings

BITSANDBYTES_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
BITSANDBYTES_HUB_KERNEL = "Failed to load CPU gemm_4bit_forward from kernels-community"
PEFT_CHECKPOINTING_ALIAS = r"`is_gradient_checkpointing` is deprecated"


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def quiet_library_noise() -> None:
    """Install the filters above (idempotent). A logger's filter applies to the records logged on it, so
    this works whether or not the library was imported yet."""
    logger = logging.getLogger(BITSANDBYTES_CPU_LOGGER)
    if not any(isinstance(f, _DropMessage) for f in logger.filters):
        logger.addFilter(_DropMessage(BITSANDBYTES_HUB_KERNEL))
    warnings.filterwarnings("ignore", message=PEFT_CHECKPOINTING_ALIAS, category=FutureWarning, module="transformers")
