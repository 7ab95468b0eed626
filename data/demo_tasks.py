"""The embedded demo dataset: short verifiable instructions with ground-truth answers.

Six kinds of task (arithmetic, sorting, reversing, counting, max/min), each with a prompt, the
ground-truth response and a programmatic check. The files in data/demo/ are made by this script and
committed; a test regenerates them and checks they are unchanged. Regenerate with:

    python -m data.demo_tasks            # writes data/demo/{train,heldout,train_20k,validation}.jsonl

validation.jsonl is for choosing a recipe's settings (`data.eval: demo:validation`): prompts drawn like
the others but shared with neither the held-out split nor any training split (train_20k contains
train), so the held-out figures stay untouched by tuning.

`verify(kind, answer, response)` is the check; `check(prompt, response, row)` is the same in the form
a recipe names as its verifier (`judge.verifier: data.demo_tasks:check`, models/judge/verifiers.py).
`check_stated` accepts the answer stated at the end of a sentence, as chat models write it.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

from data.answers import NUMBER_RE, normalize_answer

DEMO_DIR = Path(__file__).resolve().parent / "demo"
SPLIT_SIZES = {"train": 3000, "heldout": 1200}
# The held-out and validation splits held 300 prompts each before they grew to 1,200 (for a standard
# error of about 0.014 instead of 0.027): train_20k was drawn around those first 300 held-out prompts.
# Each split's first 300 rows are what they were; the rows after them avoid every other split too.
FIRST_SIZE = 300
SEED = 1234

SYLLABLES = "ba be bi bo da de di do ka ke ki ko la le li lo ma me mi mo na ne ni no ra re ri ro ta te ti to".split()


def _word(rng: random.Random) -> str:
    """A pronounceable made-up word of 2-3 syllables (enough of them that prompts rarely repeat)."""
    return "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3)))


def _add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    template = rng.choice(["What is {a} + {b}?", "Add {a} and {b}.", "Compute {a} plus {b}."])
    return template.format(a=a, b=b), str(a + b)


def _subtract(rng: random.Random) -> tuple[str, str]:
    a, b = sorted((rng.randint(10, 99), rng.randint(10, 99)), reverse=True)
    template = rng.choice(["What is {a} - {b}?", "Subtract {b} from {a}.", "Compute {a} minus {b}."])
    return template.format(a=a, b=b), str(a - b)


def _sort(rng: random.Random) -> tuple[str, str]:
    numbers = [rng.randint(0, 99) for _ in range(rng.randint(3, 5))]
    order = rng.choice(["ascending", "descending"])
    answer = sorted(numbers, reverse=order == "descending")
    prompt = f"Sort in {order} order: {' '.join(map(str, numbers))}"
    return prompt, " ".join(map(str, answer))


def _reverse(rng: random.Random) -> tuple[str, str]:
    word = _word(rng)
    template = rng.choice(["Reverse the word: {w}", "Write {w} backwards."])
    return template.format(w=word), word[::-1]


def _count(rng: random.Random) -> tuple[str, str]:
    word = _word(rng)
    letter = rng.choice(sorted(set(word)) + ["a", "e"])
    return f"How many times does the letter {letter} appear in {word}?", str(word.count(letter))


def _extreme(rng: random.Random) -> tuple[str, str]:
    numbers = rng.sample(range(100), rng.randint(3, 5))
    which = rng.choice(["largest", "smallest"])
    answer = max(numbers) if which == "largest" else min(numbers)
    return f"Which number is the {which}: {' '.join(map(str, numbers))}?", str(answer)


TASK_KINDS = {
    "add": _add,
    "subtract": _subtract,
    "sort": _sort,
    "reverse": _reverse,
    "count": _count,
    "extreme": _extreme,
}


def verify(kind: str, answer: str, response: str) -> bool:
    """True when `response` states the ground-truth `answer` of a demo task of this `kind`."""
    if kind not in TASK_KINDS:
        raise ValueError(f"unknown demo task kind {kind!r}; known: {sorted(TASK_KINDS)}")
    return normalize_answer(response) == normalize_answer(answer)


def check(prompt: str, response: str, row: dict) -> bool:
    """The demo's verifier as a recipe names it: the row carries the task kind and its answer."""
    return verify(row["task"], row["answer"], response)


def check_stated(prompt: str, response: str, row: dict) -> bool:
    """The answer as a chat model states it, at the end of a sentence ("The largest number is 44.",
    "Sorted: 11, 47, 54."): the response's last numbers, as many as the answer has, for a numeric or
    list answer, its last word for a word. `check` would score every such answer wrong (SmolLM2-135M
    never answers with the bare result); like any last-answer rule, "12, not 44" counts as 44."""
    answer = row["answer"]
    expected = NUMBER_RE.findall(answer)
    if expected and " ".join(expected) == normalize_answer(answer):
        stated = NUMBER_RE.findall(response)
        return len(stated) >= len(expected) and stated[-len(expected):] == expected
    words = re.findall(r"[a-z]+", response.lower())
    return bool(words) and words[-1] == normalize_answer(answer)


def _prompts(rows: list[dict]) -> set[str]:
    return {row["prompt"] for row in rows}


def make_split(split: str, size: int, seed: int = SEED) -> list[dict]:
    """`size` rows of the split; prompts never repeat within or across splits of one seed.

    Held-out rows past the first FIRST_SIZE also avoid train_20k and the first validation rows; adding
    those to what is avoided leaves the first rows as they were, since neither of those splits holds one
    of them (both were drawn around them)."""
    if split == "train":
        return _draw(split, size, seed, set())
    taken = _prompts(make_split("train", SPLIT_SIZES["train"], seed))
    if size > FIRST_SIZE:
        taken |= _prompts(make_large_train(LARGE_TRAIN_SIZE, seed)) | _prompts(make_validation(FIRST_SIZE, seed))
    return _draw(split, size, seed, taken)


def make_large_train(size: int, seed: int = SEED) -> list[dict]:
    """A training split of any size for a bigger warm start: its first 3,000 rows are the committed
    train split, and it never shares a prompt with the committed held-out split (its first rows, which
    it was drawn around; the later held-out rows avoid it in turn)."""
    return _draw("train", size, seed, _prompts(make_split("heldout", FIRST_SIZE, seed)))


VALIDATION_SIZE = 1200


def make_validation(size: int = VALIDATION_SIZE, seed: int = SEED) -> list[dict]:
    """Prompts for tuning a recipe: drawn like the training ones (same generators, kinds in turn), from
    their own random stream, never a prompt of the held-out split or of the 20,000-row training split
    that the warm start trains on and the rounds draw from (it contains the 3,000-row train split)."""
    taken = _prompts(make_split("heldout", FIRST_SIZE if size <= FIRST_SIZE else SPLIT_SIZES["heldout"], seed))
    taken |= {row["prompt"] for row in make_large_train(LARGE_TRAIN_SIZE, seed)}
    return _draw("validation", size, seed, taken)


def _draw(split: str, size: int, seed: int, taken: set[str]) -> list[dict]:
    rng = random.Random(f"{seed}-{split}")
    taken = set(taken)
    rows: list[dict] = []
    kinds = sorted(TASK_KINDS)
    for _attempt in range(size * 100):
        if len(rows) == size:
            break
        kind = kinds[len(rows) % len(kinds)]
        prompt, answer = TASK_KINDS[kind](rng)
        if prompt in taken:
            continue
        taken.add(prompt)
        rows.append(
            {"prompt_id": f"{split}-{len(rows):05d}", "prompt": prompt, "response": answer, "task": kind, "answer": answer}
        )
    if len(rows) < size:
        raise RuntimeError(f"only {len(rows)} distinct prompts for split {split}; widen the generators")
    return rows


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


LARGE_TRAIN_SIZE = 20000  # data/demo/train_20k.jsonl: the default demo's warm start and rounds draw from it


def write_demo(out_dir: Path = DEMO_DIR) -> dict[str, Path]:
    written = {split: write_jsonl(make_split(split, size), out_dir / f"{split}.jsonl") for split, size in SPLIT_SIZES.items()}
    written["train_20k"] = write_jsonl(make_large_train(LARGE_TRAIN_SIZE), out_dir / "train_20k.jsonl")
    written["validation"] = write_jsonl(make_validation(), out_dir / "validation.jsonl")
    return written


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEMO_DIR)
    for path in write_demo(parser.parse_args().out).values():
        print(f"wrote {path}")
