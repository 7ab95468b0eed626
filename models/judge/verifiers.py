"""Verifiers: programmatic checks of a response, built in by name or supplied by the user.

    from models.judge.verifiers import load_verifier
    verifier = load_verifier("number")             # or "my_pkg.checks:solved", or "checks.py:solved"
    verifier.score(prompt, response, row, answer)  # -> float in [0, 1]

`judge.verifier` in a recipe names one; the verifier judge pairs by it and the evaluation's accuracy
is measured with it (`exact` when none is set). Built-ins compare the response with the row's answer
(`data.answer_field`, else the ground-truth response):

- `exact`: equal after normalising case, spaces, commas and surrounding punctuation;
- `number`: the last number in the response equals the answer's (GSM8K's `#### 42` form understood,
  thousands separators allowed: "1,234" is 1234);
- `choice`: the multiple-choice letter the response gives ("(B)", "Answer: B", "B.", "B") is the answer's;
- `contains`: the normalised answer occurs in the normalised response;
- `regex`: the answer is a regular expression that `re.search` finds in the response.

A user's verifier is `package.module:function` or `path/to/file.py:function` (a relative path is
taken from the working directory), called as `function(prompt, response, row)` where `row` is a dict
of the dataset row's other scalar columns (text, numbers, booleans) under their own names. It returns
a bool or a number in [0, 1] (partial credit). A name that is unknown, a module that does not import,
a missing function or one that cannot take those three arguments is a one-line RecipeError, raised
when the recipe is checked, before any task runs.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import math
import numbers
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from common.errors import DataError, RecipeError
from data.answers import NUMBER_RE, normalize_answer

DEFAULT = "exact"
GSM8K_MARK = "####"


def last_number(text: str) -> float | None:
    """The last number in `text`; after GSM8K's '####' mark when there is one (its final answer)."""
    if GSM8K_MARK in text:
        text = text.rsplit(GSM8K_MARK, 1)[1]
    found = NUMBER_RE.findall(text)
    return float(found[-1].replace(",", "")) if found else None


def number_match(response: str, answer: str) -> bool:
    expected, given = last_number(answer), last_number(response)
    if expected is None or given is None:
        return False
    return math.isclose(given, expected, rel_tol=1e-9, abs_tol=1e-9)


LETTERS = "A-J"
# Ways a response states its choice, most explicit first; within one pattern the last match wins
# ("A is wrong, so the answer is C" -> C).
CHOICE_PATTERNS = (
    re.compile(rf"(?i:answer)\s*(?i:is)?\s*[:\-]?\s*\(?\b([{LETTERS}])\b\)?"),
    re.compile(rf"\(([{LETTERS}])\)"),
    re.compile(rf"^\s*([{LETTERS}])(?:[.):]|\s*$)"),
)


def choice_letter(text: str) -> str | None:
    """The option letter a response gives: 'Answer: B', 'the answer is (b)', '(B)', 'B.', 'B) ...', 'B'."""
    for pattern in CHOICE_PATTERNS:
        found = pattern.findall(text)
        if found:
            return found[-1].upper()
    return None


def answer_letter(answer: str) -> str | None:
    """The letter an answer column holds, in either case: 'B', 'b', '(B)', 'B.'."""
    return choice_letter(answer.strip().upper())


def choice_match(response: str, answer: str) -> bool:
    expected = answer_letter(answer)
    return expected is not None and choice_letter(response) == expected


def exact_match(response: str, answer: str) -> bool:
    return normalize_answer(response) == normalize_answer(answer)


def contains_match(response: str, answer: str) -> bool:
    return normalize_answer(answer) in normalize_answer(response)


def regex_match(response: str, answer: str) -> bool:
    return re.search(answer, response) is not None


def _answer_problem(name: str, answer) -> str | None:
    """Why `answer` cannot be checked by built-in `name` (None when it can)."""
    if not isinstance(answer, str) or not answer.strip():
        return "is empty"
    if name == "number" and last_number(answer) is None:
        return "has no number"
    if name == "choice" and answer_letter(answer) is None:
        return f"is not an option letter {LETTERS}"
    if name == "regex":
        try:
            re.compile(answer)
        except re.error as exc:
            return f"is not a valid regular expression ({exc})"
    if name in ("exact", "contains") and not normalize_answer(answer):
        return "is only punctuation"
    return None


BUILTINS: dict[str, Callable[[str, str], bool]] = {
    "exact": exact_match,
    "number": number_match,
    "choice": choice_match,
    "contains": contains_match,
    "regex": regex_match,
}


@dataclass(frozen=True)
class Verifier:
    """A loaded verifier: a built-in (compares with the row's answer) or the user's function."""

    spec: str  # as written in the recipe, e.g. "number" or "checks.py:solved"
    fn: Callable
    builtin: bool

    @property
    def needs_answer(self) -> bool:
        """Built-ins compare with an answer; a user's function decides from the row what it needs."""
        return self.builtin

    def answer_problem(self, answer) -> str | None:
        """Why this verifier cannot check against `answer` ('is empty', 'has no number', ...), or None."""
        return _answer_problem(self.spec, answer) if self.builtin else None

    def score(self, prompt: str, response: str, row: dict | None = None, answer: str | None = None) -> float:
        if self.builtin:
            problem = self.answer_problem(answer)
            if problem:
                raise DataError(f"verifier '{self.spec}': the answer of prompt {prompt[:60]!r} {problem}")
            value = self.fn(response, answer)
        else:
            value = self.fn(prompt, response, dict(row or {}))
        return _as_score(value, self.spec, prompt)


def _as_score(value, spec: str, prompt: str) -> float:
    import numpy as np

    if isinstance(value, (bool, np.bool_, numbers.Real)):
        score = float(value)
        if 0.0 <= score <= 1.0:
            return score
    raise RecipeError(
        f"judge.verifier '{spec}' returned {value!r} for prompt {prompt[:60]!r}; a verifier returns a bool or a number in [0, 1]"
    )


def load_verifier(spec: str | None) -> Verifier:
    """The verifier `spec` names (None: `exact`); a RecipeError in one line when it cannot be used."""
    spec = spec or DEFAULT
    if ":" not in spec:
        if spec not in BUILTINS:
            raise RecipeError(
                f"judge.verifier '{spec}' is not a built-in verifier (built-ins: {', '.join(BUILTINS)}); "
                "a function of your own is 'package.module:function' or 'path/to/file.py:function'"
            )
        return Verifier(spec, BUILTINS[spec], builtin=True)
    where, _, function = spec.rpartition(":")
    if not where or not function:
        raise RecipeError(f"judge.verifier '{spec}': expected 'package.module:function' or 'path/to/file.py:function'")
    module = _import_file(spec, where) if where.endswith(".py") or "/" in where else _import_module(spec, where)
    fn = getattr(module, function, None)
    if fn is None:
        raise RecipeError(f"judge.verifier '{spec}': {where} has no function '{function}'")
    if not callable(fn):
        raise RecipeError(f"judge.verifier '{spec}': {where}.{function} is not a function")
    try:
        inspect.signature(fn).bind("prompt", "response", {})
    except TypeError:
        raise RecipeError(
            f"judge.verifier '{spec}': {function}{_signature(fn)} cannot be called as {function}(prompt, response, row)"
        ) from None
    return Verifier(spec, fn, builtin=False)


def _signature(fn) -> str:
    try:
        return str(inspect.signature(fn))
    except (TypeError, ValueError):
        return "(...)"


def _import_module(spec: str, name: str):
    try:
        return importlib.import_module(name)
    except Exception as exc:  # a user's module may fail to import in any way; the user needs one line
        raise RecipeError(f"judge.verifier '{spec}': cannot import {name}: {type(exc).__name__}: {exc}") from None


def _import_file(spec: str, where: str):
    path = Path(where).expanduser().resolve()
    if not path.is_file():
        raise RecipeError(f"judge.verifier '{spec}': no such file {where}")
    # One module per file, named after its path: loading the same file twice gives the same module.
    name = f"selfplay_verifier_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
    if name in sys.modules:
        return sys.modules[name]
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:  # as above: a syntax error or a failing import in the user's file
        del sys.modules[name]
        raise RecipeError(f"judge.verifier '{spec}': cannot load {where}: {type(exc).__name__}: {exc}") from None
    return module


def can_verify(verifier: Verifier, frame) -> bool:
    """Whether `verifier` can score every row of a prompts frame: a built-in needs every row's answer."""
    if not verifier.needs_answer:
        return True
    return "answer" in frame.columns and all(isinstance(a, str) and a.strip() for a in frame["answer"])
