"""Demo data, prompt loading in both layouts, chat formatting and the Parquet schemas."""

import json

import numpy as np
import pandas as pd
import pytest

from common.errors import DataError
from configs.recipe import DataConfig
from data import demo_tasks
from data.prompts import filter_overlong, format_completion, format_prompt, load_prompts, round_prompts
from data.schema import EVAL, GENERATIONS, PAIRS, read_artifact, write_parquet
from models.load.tokenizer import build_byte_tokenizer
from conftest import REPO

FIXTURES = REPO / "data" / "fixtures"


def test_shipped_demo_files_are_what_the_generator_makes(tmp_path):
    demo_tasks.write_demo(tmp_path)
    for split in [*demo_tasks.SPLIT_SIZES, "train_20k", "validation"]:
        assert (tmp_path / f"{split}.jsonl").read_text() == (demo_tasks.DEMO_DIR / f"{split}.jsonl").read_text()


def test_demo_splits_do_not_overlap_and_answers_verify():
    train = load_prompts("demo:train", "train", DataConfig(), require_reference=True)
    heldout = load_prompts("demo:heldout", "test", DataConfig(), require_reference=True)
    assert not set(train.prompt) & set(heldout.prompt)
    assert set(train.task) == set(demo_tasks.TASK_KINDS)
    for row in heldout.head(60).itertuples():
        assert demo_tasks.verify(row.task, row.answer, row.reference)
        assert demo_tasks.verify(row.task, row.answer, f"  {row.reference}. ")
        assert not demo_tasks.verify(row.task, row.answer, row.reference + "1")


def test_large_train_split_extends_the_shipped_one_and_never_holds_a_heldout_prompt():
    large = demo_tasks.make_large_train(8000)
    heldout = {row["prompt"] for row in demo_tasks.make_split("heldout", demo_tasks.SPLIT_SIZES["heldout"])}
    assert large[:3000] == demo_tasks.make_split("train", 3000)
    assert len({row["prompt"] for row in large}) == 8000
    assert not {row["prompt"] for row in large} & heldout


def test_grown_heldout_and_validation_splits_keep_their_first_rows():
    """Both splits grew from 300 to 1,200 prompts; their first 300 are the prompts of before, so figures
    taken on the first 300 (`evaluation.num_prompts: 300`) stay comparable."""
    grown = {"heldout": demo_tasks.make_split("heldout", 1200), "validation": demo_tasks.make_validation(1200)}
    first = {"heldout": demo_tasks.make_split("heldout", 300), "validation": demo_tasks.make_validation(300)}
    for split in grown:
        assert grown[split][:300] == first[split], split
        assert len({row["prompt"] for row in grown[split]}) == 1200


def test_validation_split_shares_no_prompt_with_heldout_or_any_training_split():
    # The shipped files as the demo recipes read them: tuning on validation must never see a prompt
    # that a round trains on (train_20k, which holds train) or that the held-out figures are taken on.
    source = lambda split: load_prompts(f"demo:{split}", split, DataConfig(), require_reference=True)  # noqa: E731
    validation = source("validation")
    assert len(validation) == demo_tasks.VALIDATION_SIZE == len(set(validation.prompt))
    assert set(validation.task) == set(demo_tasks.TASK_KINDS)
    for split in ("heldout", "train_20k", "train"):
        assert not set(validation.prompt) & set(source(split).prompt), split
    for row in validation.itertuples():
        assert demo_tasks.verify(row.task, row.answer, row.reference)


def test_prompt_response_layout():
    frame = load_prompts(str(FIXTURES / "prompt_response.parquet"), "train", DataConfig(), require_reference=True)
    assert list(frame.prompt_id) == ["pr-0", "pr-1", "pr-2"] and frame.reference.iloc[2] == "tac"


def test_messages_layout_takes_first_user_turn_and_its_answer():
    frame = load_prompts(str(FIXTURES / "chat_messages.jsonl"), "train", DataConfig(), require_reference=True)
    first = frame.iloc[0]
    assert first.prompt == "Name a primary colour." and first.reference == "Red is a primary colour."
    assert frame.iloc[1].system == "You are terse." and frame.iloc[1].reference == "4"


@pytest.mark.parametrize(
    "rows, message",
    [
        ([{"prompt": "a", "response": "b"}, {"prompt": " ", "response": "c"}], r"row 1: field 'prompt' is empty"),
        ([{"prompt": "a", "response": ""}], r"row 0: field 'response' \(the ground truth\) is empty"),
        ([{"prompt": 3, "response": "x"}], r"row 0: field 'prompt' must be text"),
        ([{"text": "a"}], r"missing column\(s\) prompt"),
        ([{"prompt_id": "1", "prompt": "a", "response": "x"}, {"prompt_id": "1", "prompt": "b", "response": "y"}],
         r"row 1: duplicate prompt_id '1'"),
    ],
)
def test_bad_rows_name_file_row_and_field(tmp_path, rows, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=message) as err:
        load_prompts(str(path), "train", DataConfig(), require_reference=True)
    assert str(path) in str(err.value)


def test_repeated_prompts_without_ids_are_dropped_not_fatal(tmp_path):
    path = tmp_path / "dups.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["a", "b", "a"]))
    assert list(load_prompts(str(path), "train", DataConfig()).prompt) == ["a", "b"]


def test_ground_truth_gets_the_normalisation_samples_get(tmp_path):
    from data.prompts import clean_response

    path = tmp_path / "gt.jsonl"
    path.write_text(json.dumps({"prompt": "q", "response": "An answer.\n\n"}) + "\n")
    [reference] = load_prompts(str(path), "train", DataConfig(), require_reference=True).reference
    assert reference == clean_response("An answer.\n\n") == "An answer."


def test_round_prompts_rotate_through_the_set():
    frame = pd.DataFrame({"prompt_id": list("abcde"), "prompt": list("abcde")})
    assert list(round_prompts(frame, 1, 2).prompt_id) == ["a", "b"]
    assert list(round_prompts(frame, 3, 2).prompt_id) == ["e", "a"]
    assert len(round_prompts(frame, 1, None)) == 5


def test_completion_is_what_follows_the_prompt_in_the_template():
    tok = build_byte_tokenizer()
    prompt = format_prompt(tok, "Add 2 and 3.")
    assert prompt == "<|user|>Add 2 and 3.<|end|><|assistant|>"
    assert format_completion(tok, "Add 2 and 3.", "5") == "5<|end|>"
    assert format_prompt(tok, "hi", "be brief").startswith("<|system|>be brief<|end|>")


def test_overlong_prompts_filtered_with_count_or_refused():
    tok = build_byte_tokenizer()
    frame = pd.DataFrame({"prompt_id": ["s", "l"], "prompt": ["short", "x" * 200], "system": [None, None]})
    kept, dropped = filter_overlong(frame, tok, 64, "filter", "src")
    assert list(kept.prompt_id) == ["s"] and dropped == 1
    with pytest.raises(DataError, match=r"src: row 1: field 'prompt' is 2\d\d tokens, over data.max_prompt_tokens=64"):
        filter_overlong(frame, tok, 64, "error", "src")


def generations_frame():
    return pd.DataFrame({"prompt_id": ["a", "a", "b"], "prompt": ["p", "p", "q"], "response": ["x", "y", ""],
                         "sample_index": [0, 1, 0], "round": [1, 1, 1], "num_tokens": [1, 1, 0]})


def test_generations_round_trip(tmp_path):
    path = tmp_path / "generations.parquet"
    write_parquet(generations_frame(), path, GENERATIONS)
    back = read_artifact(path, GENERATIONS)
    pd.testing.assert_frame_equal(back, generations_frame())


def test_pairs_round_trip_keeps_the_probability_matrix(tmp_path):
    frame = pd.DataFrame({"prompt_id": ["a"], "prompt": ["p"], "chosen": ["x"], "rejected": ["y"], "chosen_score": [0.75],
                          "rejected_score": [0.25], "round": [2], "judge": ["verifier"], "prob_matrix": [[[0.5, 1.0], [0.0, 0.5]]]})
    write_parquet(frame, tmp_path / "pairs.parquet", PAIRS)
    back = read_artifact(tmp_path / "pairs.parquet", PAIRS)
    assert np.allclose(np.stack(back.prob_matrix.iloc[0]), [[0.5, 1.0], [0.0, 0.5]])
    assert back.chosen_score.iloc[0] == 0.75


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda f: f.drop(columns=["num_tokens"]), r"missing column\(s\) num_tokens"),
        (lambda f: f.assign(num_tokens=["1", "two", "3"]), r"row \d: field 'num_tokens' must be int64"),
        (lambda f: f.assign(prompt=["p", "", "q"]), r"row 1: field 'prompt' is empty"),
        (lambda f: f.assign(sample_index=[0, 0, 0]), r"row 1: duplicate prompt_id='a', sample_index=0"),
    ],
)
def test_schema_errors_name_file_row_and_field(tmp_path, change, message):
    path = tmp_path / "generations.parquet"
    with pytest.raises(DataError, match=message) as err:
        write_parquet(change(generations_frame()), path, GENERATIONS)
    assert str(path) in str(err.value) and not path.exists()


def test_reading_a_broken_file_is_one_line(tmp_path):
    path = tmp_path / "eval.parquet"
    path.write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match="not a readable Parquet file"):
        read_artifact(path, EVAL)


def test_check_stated_reads_the_answer_at_the_end_of_a_sentence():
    from data.demo_tasks import check, check_stated

    cases = [("The largest number is 44.", "44", True), ("The largest number is 12.", "44", False),
             ("Sorted: 11, 47, 54.", "11 47 54", True), ("11 54 47", "11 47 54", False),
             ("The reversed word is etil.", "etil", True), ("Lite", "etil", False), ("95 + 98 = 193", "193", True),
             ("The letter e appears 12 times.", "2", False), ("Subtract: 10-5", "5", True)]
    for response, answer, right in cases:
        assert check_stated("", response, {"answer": answer, "task": "add"}) is right, (response, answer)
    assert not check("", "The largest number is 44.", {"answer": "44", "task": "extreme"})  # the exact check
