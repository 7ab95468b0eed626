"""The lenient accuracy of the demo's tasks: the answer a response arrives at, wherever the sentence puts it.

    judge.verifier: data.lenient:check          # lenient; data.demo_tasks:check is the strict one

A chat model answers "Add 95 and 98." with "The sum of 95 and 98 is 193." The strict check
(`data.demo_tasks:check`, the bare answer) scores that wrong; a round that only teaches the model to
drop the sentence moves the strict accuracy without any gain in skill. This check reads the answer the
response states, so that the two together tell format from skill:

- add, subtract, count, extreme: the response's last number. List markers at the start of a line
  ("1. 44") are not numbers here. For `count`, number words ("three", "twice") are numbers and
  "does not appear" / "none" / "no times" say 0.
- sort: the response's last numbers, as many as the answer has, in the answer's order.
- reverse: the last word of the response spelled with exactly the letters of the word to reverse (the
  answer read backwards), other than that word itself (unless it reads the same both ways): a wrong
  reversal ("ilokab" for "kaboli") is such a word, an echo of the prompt's word or an English word
  around the answer is not.

A response cut off mid-sentence states nothing: it counts only when it ends a sentence (its last
character is `.`, `!`, `?`, a closing quote or bracket) or ends on the answer it states. Without this
rule a response cut at the length limit while restating the prompt ("To find the smallest of 15, 17
and 73, we first compare 15 t") would score its echo of the prompt's numbers.

Every rule takes the last candidate, so a response that hedges ("193, or maybe 194") is scored by what
it ends on, and a response that states the right answer and then a wrong one is wrong. Like any
last-answer rule it misreads "44 is the largest of 12, 44 and 7" (last number 7): it errs towards
scoring right answers wrong, never wrong answers right.
"""

from __future__ import annotations

import re

from data.answers import NUMBER_RE, normalize_answer

# "1. 44" / "2) 47" at the start of a line: an enumeration, not part of the answer.
LIST_MARKER_RE = re.compile(r"(?m)^\s*\d+[.)]\s+")
NUMBER_WORDS = {
    "zero": 0, "one": 1, "once": 1, "two": 2, "twice": 2, "three": 3, "thrice": 3, "four": 4, "five": 5,
    "six": 6, "seven": 7, "eight": 8, "nine": 9, "ten": 10,
}
ZERO_PHRASES_RE = re.compile(r"\b(?:does not|doesn't|do not|don't|never) appears?\b|\bno times\b|\bnone\b|\bnot (?:at all|once)\b")
COUNT_TOKEN_RE = re.compile(
    r"(?:(?<![\w.])-)?\d+(?:\.\d+)?|\b(?:" + "|".join(NUMBER_WORDS) + r")\b|" + ZERO_PHRASES_RE.pattern
)


def stated_numbers(response: str) -> list[str]:
    """The numbers of a response in order, list markers at the start of a line left out."""
    return [n.replace(",", "") for n in NUMBER_RE.findall(LIST_MARKER_RE.sub(" ", response))]


def stated_count(response: str) -> str | None:
    """The last count a response states: a number, a number word, or a phrase saying none."""
    found = COUNT_TOKEN_RE.findall(LIST_MARKER_RE.sub(" ", response.lower()))
    if not found:
        return None
    last = found[-1]
    if last in NUMBER_WORDS:
        return str(NUMBER_WORDS[last])
    if ZERO_PHRASES_RE.fullmatch(last):
        return "0"
    return last


def stated_reversal(response: str, answer: str) -> str | None:
    """The last word of `response` that is a rearrangement of the word to reverse (`answer` backwards),
    that word itself excluded unless it is a palindrome."""
    source = answer[::-1]
    letters = sorted(source)
    candidates = [w for w in re.findall(r"[a-z]+", response.lower()) if sorted(w) == letters and (w != source or source == answer)]
    return candidates[-1] if candidates else None


SENTENCE_END = tuple(".!?\"')]*")


def ends_a_statement(response: str, stated: str) -> bool:
    """Whether `response` ends a sentence, or ends on its stated answer (the last piece of `stated`)."""
    text = response.rstrip()
    if text.endswith(SENTENCE_END):
        return True
    tokens = re.findall(r"[a-z]+|\d+", text.lower())
    if not tokens:
        return False
    last = tokens[-1]
    return last == stated.split()[-1] or str(NUMBER_WORDS.get(last, "")) == stated


def lenient_answer(task: str, answer: str, response: str) -> str | None:
    """What the response states as its answer to a demo task of kind `task` (None: nothing stated)."""
    stated = _candidate(task, normalize_answer(answer), response)
    return stated if stated is not None and ends_a_statement(response, stated) else None


def _candidate(task: str, answer: str, response: str) -> str | None:
    if task in ("add", "subtract", "extreme"):
        numbers = stated_numbers(response)
        return numbers[-1] if numbers else None
    if task == "count":
        return stated_count(response)
    if task == "sort":
        wanted = len(answer.split())
        numbers = stated_numbers(response)
        return " ".join(numbers[-wanted:]) if len(numbers) >= wanted else None
    if task == "reverse":
        return stated_reversal(response, answer)
    raise ValueError(f"unknown demo task kind {task!r}")


def check(prompt: str, response: str, row: dict) -> bool:
    """The lenient verifier as a recipe names it (`data.lenient:check`): the stated answer is the row's."""
    stated = lenient_answer(row["task"], row["answer"], response)
    return stated is not None and stated == normalize_answer(row["answer"])
