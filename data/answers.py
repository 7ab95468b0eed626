"""Answers read out of a response: the normalisation and the number pattern every answer check shares
(the built-in verifiers of models/judge/verifiers.py, the demo's own check in data/demo_tasks.py).
"""

from __future__ import annotations

import re


def normalize_answer(text: str) -> str:
    """Lower-case, drop surrounding punctuation and collapse spaces and commas, so '1 2 3.' matches '1 2 3'."""
    text = re.sub(r"[\s,]+", " ", text.strip().lower())
    return text.strip(" .!?\"'")


# A number, with a minus sign only where it cannot be a hyphen ("10-5" ends in 5, not -5), and commas
# only as thousands separators, so "1,234" is one number and "1, 2, 3" three.
NUMBER_RE = re.compile(r"(?:(?<![\w.])-)?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
