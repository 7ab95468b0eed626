"""SmolLM2-135M-Instruct, a real model with a BPE tokenizer and a ChatML template, through the pipeline on CPU.

The GGUF file is fetched into the selfplay cache once per test run (conftest.py, `smollm2_gguf`) and
converted once, by the SPIN round's BaseModel; the DPO round and the behaviour tests reuse that
converted directory. What a toy model cannot show is checked here: generation stops at `<|im_end|>`,
training sees exactly the tokens generation saw and sampled, LoRA lands on the Llama projections, a
round's merged checkpoint reloads alone and gives the policy's log-probs, and the self-judge's
prompts and parsing work on the real model's answers.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import pipeline  # noqa: F401 - registers the tasks
from configs.recipe import ModelConfig
from data.schema import PAIRS, read_artifact
from tasks.iterate import Iterate
from test_pipeline import build

pytestmark = [pytest.mark.real_model, pytest.mark.slow]

TEMPLATE_TOKENS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>")
LLAMA_PROJECTIONS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
FP32 = ModelConfig(precision="fp32")

# One round in CI: 8 prompts, 16 new tokens, one optimizer step, 4 held-out prompts.
CI_RECIPE = {
    "seed": 0,
    "model": {"precision": "fp32"},
    "data": {"prompts_per_round": 8, "max_prompt_tokens": 128},
    "generation": {"num_samples": 1, "temperature": 0.7, "top_p": 0.9, "max_new_tokens": 16, "batch_size": 16},
    "training": {"epochs": 1, "batch_size": 8, "max_length": 128, "learning_rate": 1e-3, "lora_r": 8, "lora_alpha": 16,
                 "lora_target_modules": ",".join(sorted(LLAMA_PROJECTIONS)), "save_steps": 1},
    "evaluation": {"num_prompts": 4, "max_new_tokens": 16, "kl_samples": 1, "report_prompts": 2},
    "iterate": {"validation_prompts": 4},
}


def write_recipe(path: Path, **sections) -> str:
    from configs.recipe import deep_merge

    recipe = CI_RECIPE
    for key, value in sections.items():
        recipe = deep_merge(recipe, {key: value})
    import yaml

    path.write_text(yaml.safe_dump(recipe))
    return str(path)


@pytest.fixture(scope="module")
def spin_run(smollm2_gguf, tmp_path_factory):
    """One SPIN round from the GGUF file, through Luigi; its run directory and the tasks that ran."""
    root = tmp_path_factory.mktemp("smollm2")
    recipe = write_recipe(root / "smollm2_spin_ci.yaml", name="smollm2_spin_ci", algorithm="spin",
                          model={"base_model": str(smollm2_gguf)}, judge={"name": "ground_truth"})
    ran = build(Iterate(recipe=recipe, runs_dir=str(root / "runs"), rounds=1))
    return root / "runs" / "smollm2_spin_ci", recipe, ran


@pytest.fixture(scope="module")
def base_dir(spin_run) -> Path:
    return spin_run[0] / "base_model"


@pytest.fixture(scope="module")
def base(base_dir):
    """The converted base model and its tokenizer, loaded once, fp32 on the CPU."""
    from models.load.loading import load_causal_lm, load_tokenizer

    return load_causal_lm(str(base_dir), FP32).eval(), load_tokenizer(str(base_dir), FP32)


def test_spin_round_from_the_gguf_file_through_luigi(spin_run, smollm2_gguf):
    run_dir, recipe, ran = spin_run
    assert {"BaseModel", "Generate", "Judge", "Train", "Evaluate", "Report"} <= {family for family, _ in ran}
    config = json.loads((run_dir / "base_model" / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    info = json.loads((run_dir / "base_model" / "base_model.json").read_text())
    assert info["source_gguf"] == str(smollm2_gguf) and info["root_model"] == str(smollm2_gguf)
    assert info["parameters"] == 134_515_008 and info["eos_token"] == "<|im_end|>"
    pairs = read_artifact(run_dir / "round_01" / "pairs.parquet", PAIRS)
    metrics = json.loads((run_dir / "round_01" / "metrics.json").read_text())
    assert len(pairs) == 8 and metrics["train"]["stats"]["steps"] == 1
    assert metrics["generate"]["samples"] == 8 and 0 < metrics["generate"]["mean_new_tokens"] <= 16
    checkpoint = json.loads((run_dir / "round_01" / "checkpoint" / "selfplay_checkpoint.json").read_text())
    assert Path(checkpoint["parent"]) == run_dir / "base_model" and checkpoint["root_model"] == str(smollm2_gguf)
    assert build(Iterate(recipe=recipe, runs_dir=str(run_dir.parent), rounds=1)) == []  # nothing reruns


def test_generation_stops_at_im_end_and_keeps_no_template_tokens(base, monkeypatch):
    from data.prompts import format_completion, format_prompt
    from models.generate.generation import _eos_ids, generate_texts
    from models.generate.sampling import SamplingSettings

    model, tok = base
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert _eos_ids(model, tok) == [im_end]
    assert format_completion(tok, "Hi", "Hello.").endswith("Hello.<|im_end|>")  # the template's end of turn
    calls = record_generate(model, monkeypatch)
    prompts = ["What is the capital of France? Answer in one word.", "Name a colour.", "Say hello."]
    texts = [format_prompt(tok, p) for p in prompts]
    samples = generate_texts(model, tok, texts, SamplingSettings(temperature=0.0, max_new_tokens=32, batch_size=4))
    assert samples[0][0].text == "The capital of France is Paris."
    new_rows = [row for input_ids, _mask, output in calls for row in output[:, input_ids.shape[1]:].tolist()]
    assert len(new_rows) == len(prompts)
    for sample in (s[0] for s in samples):
        assert sample.finished and not any(t in sample.text for t in TEMPLATE_TOKENS) and sample.text.strip()
    for row in new_rows:
        end = row.index(im_end)  # every answer ended with <|im_end|> ...
        assert all(t == tok.pad_token_id for t in row[end:])  # ... and nothing was sampled after it
        assert im_end not in row[:end] and tok.convert_tokens_to_ids("<|im_start|>") not in row[:end]


def test_static_backend_decodes_the_greedy_tokens_of_generate(base):
    """The static backend on a CPU (packed weights, its own sampler) gives the greedy tokens of plain
    `generate` on SmolLM2 in fp32: held-out demo prompts in the chat template, left-padded to mixed
    lengths, each answer up to its end of turn, and the log-probs it sums on the way."""
    from configs.recipe import DataConfig
    from data.prompts import format_prompt, load_prompts
    from models.generate.generation import generate_texts
    from models.generate.sampling import SamplingSettings

    model, tok = base
    texts = [format_prompt(tok, p) for p in load_prompts("demo:heldout", "test", DataConfig()).prompt[:16]]
    outs = {backend: generate_texts(model, tok, texts, SamplingSettings(temperature=0.0, max_new_tokens=24, batch_size=16,
                                                                         backend=backend, logps=True))
            for backend in ("hf", "static")}
    for hf, static in zip(outs["hf"], outs["static"]):
        assert static[0].token_ids == hf[0].token_ids
        assert static[0].logp == pytest.approx(hf[0].logp, abs=1e-3)
    assert sum(s[0].finished for s in outs["hf"]) >= 4  # some rows stop early, at <|im_end|>


def record_generate(model, monkeypatch) -> list:
    """Wrap model.generate to keep every call's (input_ids, attention_mask, output ids)."""
    calls, original = [], model.generate

    def recording(*args, **kwargs):
        out = original(*args, **kwargs)
        calls.append((kwargs["input_ids"].clone(), kwargs["attention_mask"].clone(), out.clone()))
        return out

    monkeypatch.setattr(model, "generate", recording)
    return calls


class LongerIsBetter:
    """A stand-in judge (the judge is not under test here): the longer response wins."""

    name = "longer"

    def judge(self, groups):
        from models.judge.judge_types import JudgeResult, matrix_from_scores

        results = []
        for group in groups:
            scores = np.array([float(len(r)) for r in group.responses])
            results.append(JudgeResult(matrix_from_scores(scores), scores=scores))
        return results


def test_training_tokens_are_the_prompt_generation_saw_plus_the_sample_plus_end_of_turn(base_dir, base, monkeypatch, tmp_path):
    """Generate -> pairs -> the trainer's encoding, on the real tokenizer: every trained sequence is the
    prompt as generation saw it, then exactly the tokens sampled, then <|im_end|> (nothing after it)."""
    from configs.recipe import recipe_from_dict
    from data.prompts import load_prompts
    from models.generate.generation import generate_round
    from models.judge.judges import pair_round
    from models.train.trainer import encode_pairs

    model, tok = base
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    monkeypatch.setattr("models.load.loading.load_policy", lambda *args, **kwargs: model)  # loaded once already
    calls = record_generate(model, monkeypatch)
    recipe = recipe_from_dict({**CI_RECIPE, "algorithm": "spin", "judge": {"name": "ground_truth"},
                               "generation": {**CI_RECIPE["generation"], "num_samples": 2, "max_new_tokens": 24}})
    prompts = load_prompts("demo:heldout", "test", recipe.data, require_reference=True).head(6)
    generations, _ = generate_round(recipe, str(base_dir), prompts, 1, tmp_path / "work")

    # What generation saw and sampled, recorded at model.generate: the prompt without its left padding,
    # the new tokens up to and with <|im_end|> (what follows it is padding).
    sampled = {}
    for input_ids, attention_mask, output in calls:
        for row_in, mask, row_out in zip(input_ids.tolist(), attention_mask.tolist(), output[:, input_ids.shape[1]:].tolist()):
            new = row_out[: row_out.index(im_end) + 1] if im_end in row_out else row_out
            sampled[tuple(new)] = [t for t, m in zip(row_in, mask) if m]
    assert all(tuple(ids) in sampled for ids in generations.token_ids)  # every sample kept the ids it was sampled as

    spin_pairs, _ = pair_round(recipe, generations, 1)
    dpo = recipe_from_dict({**recipe.to_dict(), "algorithm": "dpo", "judge": {"name": "verifier"}, "rounds": []})
    dpo_pairs, _ = pair_round(dpo, generations, 1, LongerIsBetter())
    checked = 0
    for pairs in (spin_pairs, dpo_pairs):
        for side, encoded in zip(("chosen", "rejected"), encode_pairs(tok, pairs, max_length=1024)):
            for row, enc in zip(pairs.to_dict("records"), encoded):
                assert enc.completion_ids[-1] == im_end  # the turn ends there: no template newline after it
                ids = row[f"{side}_token_ids"]
                if ids is None:  # SPIN's ground truth: the reference as text, then the end of turn
                    assert side == "chosen" and enc.completion_ids == tok(row["chosen"] + "<|im_end|>", add_special_tokens=False).input_ids
                    continue
                ids = list(ids)
                assert enc.prompt_ids == sampled[tuple(ids)], f"{row['prompt_id']}: the prompt trained on is not the one generation saw"
                finished = ids[-1] == im_end
                assert finished == row[f"{side}_finished"]
                expected = ids if finished else ids + [im_end]  # a sample cut at the length limit gets the end of turn
                assert enc.completion_ids == expected, (
                    f"{row['prompt_id']} {side}: trained {tok.convert_ids_to_tokens(enc.completion_ids)}, "
                    f"sampled {tok.convert_ids_to_tokens(ids)} ({'finished' if finished else 'cut at the length limit'})")
                checked += 1
    assert checked == len(spin_pairs) + 2 * len(dpo_pairs) > 0


def test_lora_lands_on_every_llama_projection(base):
    from configs.recipe import TrainingConfig
    from models.load.loading import add_lora

    model, _tok = base
    layers = model.config.num_hidden_layers
    for targets in ("all-linear", ",".join(sorted(LLAMA_PROJECTIONS))):
        peft_model = add_lora(model, TrainingConfig(lora_r=4, lora_alpha=8, lora_target_modules=targets))
        wrapped = [name for name, module in peft_model.named_modules() if hasattr(module, "lora_A") and hasattr(module, "base_layer")]
        kinds = {name.rsplit(".", 1)[-1] for name in wrapped}
        assert kinds == LLAMA_PROJECTIONS, targets  # and not the tied LM head or the embeddings
        assert len(wrapped) == layers * len(LLAMA_PROJECTIONS)
        trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
        # r (in + out) per projection: q,o 576x576; k,v 576x192; gate,up 576x1536; down 1536x576.
        assert trainable == layers * 4 * (2 * (576 + 576) + 2 * (576 + 192) + 3 * (576 + 1536))
        peft_model.unload()  # take the adapter out again: the fixture's model is shared


def test_merged_checkpoint_reloads_alone_and_gives_the_policys_logps(spin_run, base_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from models.load.loading import load_tokenizer
    from models.logps import batched_logps
    from models.train.trainer import encode_pairs

    run_dir = spin_run[0]
    checkpoint = run_dir / "round_01" / "checkpoint"
    assert "quantization_config" not in json.loads((checkpoint / "config.json").read_text())
    merged = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()  # from_pretrained alone
    base_model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    policy = PeftModel.from_pretrained(base_model, checkpoint / "adapter").eval()  # the round's policy, unmerged

    tok = load_tokenizer(str(checkpoint), FP32)
    pairs = read_artifact(run_dir / "round_01" / "pairs.parquet", PAIRS)
    chosen, rejected = encode_pairs(tok, pairs, max_length=128)
    items = chosen + rejected
    merged_logps = torch.tensor(batched_logps(merged, tok, items, 8, torch.device("cpu"))[0])
    policy_logps = torch.tensor(batched_logps(policy, tok, items, 8, torch.device("cpu"))[0])
    with policy.disable_adapter():
        base_logps = torch.tensor(batched_logps(policy, tok, items, 8, torch.device("cpu"))[0])
    # fp32 on the CPU: folding B@A into W changes the rounding only; 1e-3 nats per sequence (of ~20 tokens)
    # bounds it, while the round moved these log-probs by far more than that.
    assert (merged_logps - policy_logps).abs().max() < 1e-3
    assert (policy_logps - base_logps).abs().max() > 0.05


def test_evaluate_folds_the_adapter_in_its_packed_weights_as_peft_merges_it(spin_run, base_dir, monkeypatch):
    """On a CPU Evaluate leaves the root weights alone and lets packing fold the round's adapter in
    (models/packing.py); the eval frame is the one folding through peft's merge gives."""
    import models.packing as packing
    from configs.recipe import load_recipe
    from data.layout import RunLayout
    from data.schema import EVAL
    from models.evaluate.evaluation import evaluate_rows
    from tasks.evaluate import eval_prompts

    run_dir, recipe_path, _ = spin_run
    run = RunLayout(run_dir)
    recipe = load_recipe(recipe_path).for_round(1)
    recipe.generation.backend = "static"  # the real-model recipes' backend (the CI round ran the default, hf)
    heldout, base_frame = eval_prompts(recipe), read_artifact(run.eval(0), EVAL)
    folds = []
    monkeypatch.setattr(packing, "folds_adapters", lambda model, real=packing.folds_adapters: folds.append(real(model)) or folds[-1])

    def frame():
        return evaluate_rows(recipe, 1, str(run.checkpoint(1)), str(base_dir), heldout, base_frame, base_frame)[0]

    by_packing = frame()
    monkeypatch.setattr(packing, "folds_adapters", lambda model: False)
    by_merge = frame()
    assert folds == [True]
    assert by_packing.response.tolist() == by_merge.response.tolist()
    np.testing.assert_allclose(by_packing.logp, by_merge.logp, atol=1e-3)
    samples = by_packing.kind == "sample"
    # the root unmerged after the merge differs from the root as loaded by rounding alone
    np.testing.assert_allclose(by_packing.base_logp[samples], by_merge.base_logp[samples], atol=1e-3)
    assert (by_packing.logp - by_packing.base_logp)[samples].abs().max() > 0.01  # the round moved the policy


def test_self_judge_reads_verdicts_from_the_real_models_answers(base, monkeypatch):
    from data.prompts import format_prompt
    from models.judge.judge_types import JudgeGroup
    from models.judge.judges import POINTWISE_PROMPT, SelfJudge, parse_score, parse_verdict

    model, tok = base
    groups = [JudgeGroup("Name three fruits that are yellow.", ["Bananas, lemons and pineapples.", "Apples are red."]),
              JudgeGroup("Explain what a rainbow is in one sentence.",
                         ["A rainbow is an arc of colours made when sunlight is bent by raindrops.", "I like trains."])]
    read = 0
    for mode, parse, opening in (("pointwise", parse_score, "\nScore:"), ("pairwise", parse_verdict, "\nBetter:")):
        judge = SelfJudge(model, tok, mode, batch_size=8, max_new_tokens=24)
        calls = record_judge_generations(judge, monkeypatch)
        results = judge.judge(groups)

        (asked, answers), *again = calls
        assert all(t.startswith("<|im_start|>system\n") and t.endswith("<|im_end|>\n<|im_start|>assistant\n") for t in asked)
        if mode == "pointwise":
            assert asked[0] == format_prompt(tok, POINTWISE_PROMPT.format(prompt=groups[0].prompt, response=groups[0].responses[0]))
        verdicts = [parse(a) for a in answers]
        missing = [i for i, v in enumerate(verdicts) if v is None]
        if missing:  # the model's own answers, continued after the verdict's opening
            [(continued_texts, continuations)] = again
            assert continued_texts == [asked[i] + answers[i] + opening for i in missing]
            for i, extra in zip(missing, continuations):
                verdicts[i] = parse(opening + extra)
        assert sum(r.unparsed for r in results) == verdicts.count(None)
        assert sum(r.reprompted for r in results) == len(missing)
        read += len(verdicts) - verdicts.count(None)
        if mode == "pointwise":
            scores = np.concatenate([r.scores for r in results])
            assert np.array_equal(scores, np.array([np.nan if v is None else v for v in verdicts]), equal_nan=True)
    # SmolLM2-135M restates the response instead of judging it, and asked again after 'Score:' it writes
    # '10' (not out of 5: unparsed); after 'Better:' it names A or B. A weak judge, but one that is read.
    assert read > 0


def record_judge_generations(judge, monkeypatch) -> list:
    """Wrap the judge's generation to keep every call's (prompt texts, answers)."""
    calls, generate = [], judge._generate

    def recording(texts, max_new_tokens):
        answers = generate(texts, max_new_tokens)
        calls.append((texts, answers))
        return answers

    monkeypatch.setattr(judge, "_generate", recording)
    return calls


@pytest.fixture(scope="module")
def self_judged_run(base_dir, tmp_path_factory):
    """One iterative-DPO round, the model judging its own samples, from the SPIN run's converted base."""
    from conftest import REPO

    root = tmp_path_factory.mktemp("smollm2_self")
    recipe = write_recipe(
        root / "smollm2_self_ci.yaml", name="smollm2_self_ci", algorithm="dpo", model={"base_model": str(base_dir)},
        # validation none: every training prompt stays in the round, the 8 prompts this small judge was checked on
        data={"train": str(REPO / "data/fixtures/open_instructions.jsonl"),
              "eval": str(REPO / "data/fixtures/open_instructions_heldout.jsonl"), "validation": "none"},
        iterate={"select": "last"},
        generation={"num_samples": 4, "temperature": 1.0},
        # 16 new tokens cut every sample; `keep` lets cut samples be chosen, or no pair could be made
        judge={"name": "self", "self_mode": "pointwise", "batch_size": 32, "max_new_tokens": 16, "unfinished": "keep"},
        evaluation={"judge": "self", "num_prompts": 2},
    )
    build(Iterate(recipe=recipe, runs_dir=str(root / "runs"), rounds=1))
    return root / "runs" / "smollm2_self_ci"


def test_dpo_round_judged_by_the_model_itself_through_luigi(self_judged_run, base_dir):
    metrics = json.loads((self_judged_run / "round_01" / "metrics.json").read_text())
    judge, train, evaluation = metrics["judge"], metrics["train"]["stats"], metrics["eval"]
    asked = judge["prompts"] * 4
    assert judge["prompts"] == 8 and judge["pairs"] + judge["skipped_ties"] + judge["skipped_identical"] == 8
    # The round's figures say how many verdicts could not be read (ties) and how many needed 'Score:' written.
    assert 0 <= judge["unparsed_judgements"] <= judge["reprompted_judgements"] <= asked
    assert judge["unparsed_judgements"] < asked and judge["pairs"] >= 1 and train["pairs"] == judge["pairs"] and train["steps"] == 1
    # Held-out: 2 prompts, our answer and the other's scored, against the previous round and the base.
    assert evaluation["eval_judge"] == "self" and 0 <= evaluation["eval_judge_unparsed"] <= 2 * 2 * 2
    pairs = read_artifact(self_judged_run / "round_01" / "pairs.parquet", PAIRS)
    assert (pairs.judge == "self").all() and (pairs.chosen_score > pairs.rejected_score).all()
    assert pairs.chosen_token_ids.notna().all() and pairs.rejected_token_ids.notna().all()
    info = json.loads((self_judged_run / "round_01" / "checkpoint" / "selfplay_checkpoint.json").read_text())
    assert info["root_model"] == str(base_dir)  # a converted directory works as model.base_model like any HF model
