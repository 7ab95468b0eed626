"""Recipes: YAML files in configs/ validated into dataclasses.

A recipe is one YAML mapping with the sections below. Every key is checked: an unknown or misspelled
key, a wrong type or a value outside its choices is a `RecipeError` naming the file and the dotted key
(alignment-handbook silently ignores a misnamed key; we refuse it).

Per-round settings: the SPIN scripts change the learning rate and beta between iterations, so
`rounds:` holds a list of partial recipes; entry i is merged over the defaults for round i + 1.

    from configs.recipe import load_recipe
    recipe = load_recipe("configs/demo_spin.yaml")
    round_2 = recipe.for_round(2)

Every key has a type, a default and a help text; one command lists them (with a recipe's own values
beside the defaults when one is given):

    python -m configs.recipe --fields [configs/demo_dpo.yaml]
    python -m configs.recipe --list          # the shipped recipes; `--recipe NAME` finds one from any directory
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from common.errors import RecipeError
from configs.evaluation import check_evaluation

CONFIG_DIR = Path(__file__).resolve().parent

Algorithm = Literal["spin", "sppo", "dpo", "inpo", "dno", "rest"]
JudgeName = Literal["ground_truth", "pairrm", "self", "reward_model", "verifier"]
LossName = Literal["dpo_sigmoid", "ipo", "hinge", "robust", "sppo", "simpo", "inpo", "nll"]


def _check_bounds(where: str, section: str, values, positive: tuple = (), non_negative: tuple = (),
                  fraction: tuple = ()) -> None:
    """Refuse a section's out-of-range values at load, naming the key: zero or negative values would divide by
    zero (save_steps), build empty models or batches, or silently do nothing, hours into a run. `positive`: > 0
    (null allowed where the field allows it), `non_negative`: >= 0, `fraction`: in [0, 1)."""
    for name in positive:
        value = getattr(values, name)
        if value is not None and value <= 0:
            raise RecipeError(f"{where}: {section}.{name} must be positive, got {value}")
    for name in non_negative:
        if getattr(values, name) < 0:
            raise RecipeError(f"{where}: {section}.{name} must be >= 0, got {getattr(values, name)}")
    for name in fraction:
        if not 0 <= getattr(values, name) < 1:
            raise RecipeError(f"{where}: {section}.{name} must be in [0, 1), got {getattr(values, name)}")


@dataclass
class ModelConfig:
    base_model: str | None = field(
        default=None,
        metadata={"help": "HF path or hub id of the causal LM, or a GGUF file (a path or cache:NAME); demo: the shipped demo base "
                          "(data/demo/base_model) whatever demo_model says; null: a demo model, the shipped one when demo_model, "
                          "data.train and seed are those it was built with, else one built on data.train (said when it starts)."}
    )
    revision: str | None = field(default=None, metadata={"help": "Hub revision of base_model."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Run code shipped with the model (off: safer)."})
    precision: Literal["auto", "bf16", "fp16", "fp32"] = field(
        default="auto", metadata={"help": "Weights dtype; auto = bf16 on a GPU that has it, else fp32."}
    )
    quantization: Literal["none", "4bit"] = field(
        default="none", metadata={"help": "4bit = QLoRA: nf4, double quant, bf16 compute (bitsandbytes)."}
    )
    attn_implementation: str = field(default="sdpa", metadata={"help": "Attention kernel passed to from_pretrained."})


@dataclass
class DemoModelConfig:
    """The small Llama-style model the pipeline builds when `model.base_model` is null."""

    hidden_size: int = field(default=128, metadata={"help": "Width of the demo model (Llama-style, byte-level tokenizer)."})
    num_layers: int = field(default=4, metadata={"help": "Decoder layers of the demo model."})
    num_heads: int = field(
        default=4, metadata={"help": "Attention heads of the demo model; hidden_size must be a multiple of it."}
    )
    intermediate_size: int = field(default=384, metadata={"help": "MLP width of the demo model."})
    sft_steps: int = field(
        default=800, metadata={"help": "Supervised warm-start steps on data.train's ground truth before round 1."}
    )
    sft_batch_size: int = field(default=32, metadata={"help": "Sequences per warm-start step."})
    sft_learning_rate: float = field(
        default=1e-3,
        metadata={"help": "Peak AdamW learning rate of the warm start (warm-up over the first "
                          "tenth of the steps, linear decay to 0)."},
    )
    sft_examples: int | None = field(default=None, metadata={"help": "Train rows used for the warm start; null = all."})

    def check(self, where: str) -> None:
        _check_bounds(where, "demo_model", self, positive=("hidden_size", "num_layers", "num_heads", "intermediate_size",
                                                            "sft_steps", "sft_batch_size", "sft_learning_rate", "sft_examples"))
        if self.hidden_size % self.num_heads:
            raise RecipeError(f"{where}: demo_model.hidden_size ({self.hidden_size}) must be a multiple of "
                              f"demo_model.num_heads ({self.num_heads})")

@dataclass
class DataConfig:
    train: str = field(
        default="demo:train", metadata={"help": "Prompts (and ground truth): demo:<split>, .parquet, .jsonl or hub id."}
    )
    eval: str = field(default="demo:heldout", metadata={"help": "Held-out prompts, never trained on."})
    train_split: str = field(default="train", metadata={"help": "Split name when `train` is a hub dataset."})
    eval_split: str = field(default="test", metadata={"help": "Split name when `eval` is a hub dataset."})
    validation: str | None = field(
        default=None,
        metadata={"help": "Validation prompts, scored every round to pick the best round and stop early "
                          "(iterate.select_by), never trained on, apart from data.eval: demo:<split>, .parquet, "
                          ".jsonl or hub id; null: demo:validation for the demo's data, a hub dataset's "
                          "validation_split, else data.validation_fraction of the training prompts; none: no "
                          "validation split."},
    )
    validation_split: str = field(
        default="validation", metadata={"help": "Split name when `validation` (or, with it null, `train`) is a hub dataset."}
    )
    validation_fraction: float = field(
        default=0.1,
        metadata={"help": "With no validation split: the share of the training prompts set aside for it, chosen by a "
                          "stable hash of the prompt id (the same on every rerun), never trained on; 0: none."},
    )
    layout: Literal["auto", "prompt_response", "messages"] = field(
        default="auto",
        metadata={"help": "prompt_response: prompt and response columns; messages: chat turns; auto: "
                          "messages when that column is there and no prompt column."},
    )
    prompt_field: str = field(default="prompt", metadata={"help": "Column of the prompt (layout prompt_response)."})
    response_field: str = field(
        default="response",
        metadata={"help": "Column of the ground-truth response (layout "
                          "prompt_response); SPIN needs it in every row."},
    )
    messages_field: str = field(
        default="messages",
        metadata={"help": "Column of the {role, content} turns (layout messages): first user "
                          "turn = prompt, the assistant turn after it = ground truth."},
    )
    id_field: str = field(
        default="prompt_id", metadata={"help": "Column of prompt ids; when absent, an id is made from the prompt's text."}
    )
    answer_field: str = field(
        default="answer", metadata={"help": "Column the verifier checks against; when absent, the ground-truth response."}
    )
    task_field: str | None = field(
        default=None, metadata={"help": "Column of task kinds, for figures per kind; null: 'task' when the data has one."}
    )
    system_prompt: str | None = field(default=None, metadata={"help": "System prompt for rows that carry none; null: none."})
    prompts_per_round: int | None = field(
        default=None, metadata={"help": "Prompts each round samples (rotating through the set); null = all."}
    )
    max_prompt_tokens: int = field(
        default=512,
        metadata={"help": "Longer prompts are filtered or an error; capped at training.max_length - generation.max_new_tokens."},
    )
    overlong_prompts: Literal["filter", "error"] = field(
        default="filter",
        metadata={"help": "Prompts over the token limit: filter = skipped (and "
                          "counted), error = the run stops naming the row."},
    )

    def check(self, where: str) -> None:
        _check_bounds(where, "data", self, positive=("max_prompt_tokens", "prompts_per_round"))

@dataclass
class GenerationConfig:
    num_samples: int = field(default=1, metadata={"help": "Samples per prompt (K); SPPO uses 5."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature of the round's samples; 0 = greedy."})
    top_p: float = field(
        default=1.0, metadata={"help": "Nucleus sampling: keep the most likely tokens up to this probability mass; 1 = off."}
    )
    max_new_tokens: int = field(
        default=64, metadata={"help": "Longest sample in tokens; a sample cut here is unfinished (see judge.unfinished)."}
    )
    batch_size: int = field(
        default=64, metadata={"help": "Sequences generated together; halved by itself on CUDA out-of-memory."}
    )
    shard_size: int = field(default=256, metadata={"help": "Prompts per resumable part of a round's generation."})
    shards: int = field(
        default=1, metadata={"help": "Luigi tasks a round's generation is split into, each on one GPU (the parts of "
                                     "shard_size prompts dealt out in order); samples do not depend on it."}
    )
    backend: Literal["hf", "static", "vllm"] = field(
        default="hf", metadata={"help": "hf = transformers generate; static = our static-cache CUDA-graph loop."}
    )
    tensor_parallel_size: int = field(
        default=1, metadata={"help": "GPUs one vLLM engine spans (backend vllm), for a model that does not fit one; "
                                     "each generation shard then holds that many."}
    )

    def check(self, where: str) -> None:
        _check_bounds(where, "generation", self, non_negative=("temperature",), positive=(
            "num_samples", "max_new_tokens", "batch_size", "shard_size", "shards", "tensor_parallel_size"))
        if not 0 < self.top_p <= 1:
            raise RecipeError(f"{where}: generation.top_p must be in (0, 1], got {self.top_p}")
        if self.tensor_parallel_size > 1 and self.backend != "vllm":
            raise RecipeError(f"{where}: generation.tensor_parallel_size {self.tensor_parallel_size} needs generation.backend: vllm")

@dataclass
class JudgeConfig:
    name: JudgeName = field(
        default="ground_truth",
        metadata={"help": "Who makes pairs: ground_truth (SPIN), verifier, pairrm, reward_model, "
                          "or self (the model judges its own samples)."},
    )
    model: str | None = field(default=None, metadata={"help": "PairRM or reward model path/hub id."})
    verifier: str | None = field(
        default=None,
        metadata={"help": "exact, number, choice, contains, regex, or 'pkg.module:fn' / 'file.py:fn'; null: exact. "
                          "Pairs for judge verifier; the evaluation's accuracy for every judge."},
    )
    self_mode: Literal["pointwise", "pairwise"] = field(
        default="pointwise",
        metadata={"help": "Self-judge: pointwise = the additive 5-point rubric of Self-Rewarding LMs, 'Score: N' per sample; "
                          "pairwise = every ordered pair, 'Better: A/B', asked in both orders."},
    )
    self_model: Literal["policy", "base"] = field(
        default="policy",
        metadata={"help": "Which model the self-judge is: policy = the current policy, the model after round r-1 "
                          "that generated round r's samples (Self-Rewarding LMs: the judge improves with the "
                          "policy); base = the base model, a fixed judge."},
    )
    batch_size: int = field(default=16, metadata={"help": "Sequences the judge model scores or writes together."})
    max_new_tokens: int = field(default=32, metadata={"help": "Tokens the self-judge may write."})
    shards: int = field(
        default=1, metadata={"help": "Luigi tasks a round's judging is split into, each on one GPU (its prompts dealt "
                                     "out in order); pairs are the same whatever the number of workers."}
    )
    add_reference: bool = field(
        default=False,
        metadata={"help": "Judge the dataset's response as one more candidate beside the K samples, so it can be "
                          "chosen (or rejected) like them (DNO's gold answer); needs a response in every data row."},
    )
    min_margin: float = field(
        default=0.0,
        metadata={"help": "Keep a pair only when chosen's score exceeds rejected's by more than this (DNO's "
                          "large-margin filter): win rates in [0, 1] for sppo and dno, the judge's scores otherwise."},
    )
    refine: bool = field(
        default=False,
        metadata={"help": "SPaR-style refinement pairs: where even the best sample fails the judge, the round's "
                          "model rewrites it with refine_prompt, and a rewrite that passes is chosen against it."},
    )
    refine_prompt: str | None = field(
        default=None,
        metadata={"help": "The refinement request, with {prompt} and {response} in it; null: models.judge.judges.REFINE_PROMPT."},
    )
    refine_samples: int = field(default=4, metadata={"help": "Rewrites sampled per failing answer (judge.refine)."})
    pass_score: float | None = field(
        default=None,
        metadata={"help": "A response passes the judge when its score is at least this: algorithm rest keeps the samples "
                          "that pass (ReST's threshold tau; a rising schedule is a rounds: override), judge.refine and "
                          "judge.rationalize rewrite where none passes; within the judge's scores ([0, 1] for the "
                          "verifier, [0, 5] for the pointwise self-judge); null: 0.5 for the verifier (a right "
                          "answer), required for other judges."},
    )
    max_per_prompt: int | None = field(
        default=None,
        metadata={"help": "algorithm rest: at most this many passing samples of one prompt become examples, distinct "
                          "ones first (highest score, then sample order); null: every sample that passes."},
    )
    rationalize: bool = field(
        default=False,
        metadata={"help": "algorithm rest, STaR's rationalization: where no sample passes, the round's model samples "
                          "again with the ground-truth answer given as a hint (rationalize_prompt); the rewrites "
                          "that pass are trained on after the prompt without the hint."},
    )
    rationalize_prompt: str | None = field(
        default=None,
        metadata={"help": "The hinted request, with {prompt} and {answer} in it (the answer: data.answer_field, else the "
                          "ground-truth response); null: models.judge.self_training.RATIONALIZE_PROMPT."},
    )
    rationalize_samples: int = field(
        default=4, metadata={"help": "Hinted samples per prompt that no sample passed (judge.rationalize)."}
    )
    keep_identical: bool = field(
        default=False,
        metadata={"help": "SPIN: keep a pair whose sample equals the ground truth, as Chen et al. 2024 pair every "
                          "prompt; its DPO gradient is zero, but the NLL anchor (training.nll_weight) then fits every "
                          "prompt's answer, not only those the model got wrong."},
    )
    unfinished: Literal["keep", "drop", "penalize"] = field(
        default="penalize",
        metadata={"help": "Samples cut at max_new_tokens: penalize = lose to every finished one (never chosen); "
                          "drop = never paired; keep = paired like any other."},
    )

    def check(self, where: str) -> None:
        _check_bounds(where, "judge", self, non_negative=("min_margin",), positive=(
            "shards", "batch_size", "max_new_tokens", "refine_samples", "rationalize_samples", "max_per_prompt"))

@dataclass
class TrainingConfig:
    loss: LossName | None = field(
        default=None, metadata={"help": "null: sppo for SPPO, inpo for INPO, dpo_sigmoid otherwise."}
    )
    beta: float = field(
        default=0.1,
        metadata={"help": "Scale of the implicit reward beta * log(pi / pi_ref): larger keeps the policy "
                          "nearer the reference; IPO's tau; SPPO's eta = 1/beta (and INPO's, unless inpo_eta is set)."},
    )
    learning_rate: float = field(
        default=5e-5, metadata={"help": "Peak AdamW learning rate of the LoRA adapter (linear warm-up, then linear decay to 0)."}
    )
    epochs: float = field(default=2.0, metadata={"help": "Passes over the round's pairs; fractions allowed."})
    batch_size: int = field(
        default=8, metadata={"help": "Pairs per micro-batch (chosen and rejected go through the model together)."}
    )
    grad_accum_steps: int = field(
        default=1,
        metadata={"help": "Micro-batches per optimizer step: the effective "
                          "batch is batch_size * grad_accum_steps * num_processes."},
    )
    max_length: int = field(
        default=1024,
        metadata={"help": "Longest prompt + response in tokens; a longer pair keeps its prompt and has its responses cut."},
    )
    warmup_ratio: float = field(
        default=0.1, metadata={"help": "Fraction of the round's optimizer steps spent warming the learning rate up from 0."}
    )
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay of the adapter's weights."})
    max_grad_norm: float = field(
        default=1.0, metadata={"help": "Gradients are clipped to this global norm before each optimizer step."}
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank; fixed for the run, since every round continues one adapter."})
    lora_alpha: int = field(
        default=32, metadata={"help": "LoRA scaling: the update is (lora_alpha / lora_r) * B A; fixed for the run."}
    )
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA branch's input during training, in [0, 1)."})
    lora_target_modules: str = field(default="all-linear", metadata={"help": "'all-linear' or comma-separated names."})
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Recompute activations in the backward pass: less memory, more time."}
    )
    shared_prompt: bool = field(
        default=True, metadata={"help": "Run each pair's prompt once for both sides (Llama/Qwen/Mistral-style models without "
                                "gradient checkpointing; same log-probs, fewer tokens); false runs two full sequences per pair."}
    )
    init: Literal["previous", "base"] = field(
        default="previous",
        metadata={"help": "Where the round's adapter starts: previous = the model the round continues (its parent); "
                          "base = a fresh adapter on the base model, trained on the round's examples (and what "
                          "mix_rounds or accumulate add) as ReST-EM and STaR fine-tune the base afresh each iteration. The round's samples still come from its "
                          "parent, and training.reference keeps its meaning."},
    )
    accumulate: bool = field(
        default=False,
        metadata={"help": "Add every earlier round's examples (or pairs) whole, in the line this round continues "
                          "(STaR's outer loop over everything collected): mix_rounds with 1.0 for every earlier round."},
    )
    mix_previous_round: bool | None = field(
        default=None,
        metadata={"help": "The older spelling of mix_rounds: true is mix_rounds [1.0], false is []; null: mix_rounds decides."},
    )
    mix_rounds: list[float] | None = field(
        default=None,
        metadata={"help": "Share of each earlier round's pairs added to this round's: entry k (from 0) for the round k + 1 "
                          "before it, in the line this round continues. [1.0]: SPIN's official recipe (the previous "
                          "round's pairs whole); [0.3, 0.15, 0.075]: DNO's (Rosset et al. 2024, Sec. 5.1: at most 30% "
                          "from t-1, 15% from t-2, ...); []: this round's only; null: [1.0] for SPIN, [] otherwise."},
    )
    reference: Literal["previous", "base", "ema"] = field(
        default="previous",
        metadata={"help": "The reference pi_ref of the loss: previous = the model the round continues (SPIN, SPPO); "
                          "base = the base model, the adapter switched off (RLHFlow's iterative DPO); ema = an "
                          "exponential average of the adapter across rounds (training.reference_ema)."},
    )
    reference_ema: float | None = field(
        default=None,
        metadata={"help": "reference: ema: the weight the average keeps, ref_r = w * ref_{r-1} + (1 - w) * adapter_r, "
                          "in [0, 1) (0: the previous round; near 1: the base); null: 0.5."},
    )
    nll_weight: float = field(
        default=0.0, metadata={"help": "Weight of the chosen response's per-token NLL added to the loss (Iterative RPO)."}
    )
    simpo_gamma: float = field(default=0.5, metadata={"help": "SimPO target margin (gamma)."})
    inpo_eta: float | None = field(
        default=None,
        metadata={"help": "INPO's eta, the step size of its mirror descent: the loss pulls the pair's log-ratio "
                          "combination to eta/2 (models/train/losses.py, inpo); null: 1 / beta."},
    )
    inpo_tau: float | None = field(
        default=None,
        metadata={"help": "INPO's tau, the weight of the KL toward the base model; eta * tau must be in [0, 1] "
                          "(0: only the previous round is the reference); null: eta * tau = 1/3, as the authors ran it."},
    )
    label_smoothing: float = field(
        default=0.0, metadata={"help": "Assumed label-flip rate in [0, 0.5): cDPO for dpo_sigmoid, robust DPO's epsilon."}
    )
    save_steps: int = field(default=50, metadata={"help": "Trainer checkpoint every N optimizer steps (for resume)."})
    save_merged: bool = field(default=True, metadata={"help": "Write a merged full-precision copy beside the adapter."})
    launcher: Literal["none", "accelerate"] = field(
        default="none", metadata={"help": "accelerate: Train runs under `accelerate launch` (DDP, or FSDP via a config)."}
    )
    num_processes: int = field(
        default=1, metadata={"help": "Processes `accelerate launch` starts (launcher: accelerate), one per GPU."}
    )
    accelerate_config: str | None = field(default=None, metadata={"help": "An `accelerate config` file (e.g. FSDP)."})

    def check(self, where: str) -> None:
        _check_bounds(where, "training", self, positive=(
            "batch_size", "grad_accum_steps", "beta", "learning_rate", "epochs", "max_length", "max_grad_norm", "lora_r",
            "lora_alpha", "save_steps", "num_processes"), non_negative=("weight_decay", "nll_weight"),
            fraction=("warmup_ratio", "lora_dropout"))
        # label_smoothing: the flip rate of cDPO (dpo_sigmoid) and robust DPO; at 0.5 or more the labels
        # carry no information (and robust's 1/(1 - 2 eps) blows up), and the other losses have no use for it.
        if not 0 <= self.label_smoothing < 0.5:
            raise RecipeError(f"{where}: training.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")

@dataclass
class EvalConfig:
    judge: Literal["auto", "none", "pairrm", "self", "reward_model", "verifier"] = field(
        default="auto", metadata={"help": "auto: the recipe's judge, or the verifier when it pairs by ground truth."}
    )
    num_prompts: int = field(default=100, metadata={"help": "Held-out prompts evaluated each round: the first N of data.eval."})
    max_new_tokens: int = field(default=64, metadata={"help": "Longest greedy and sampled held-out response in tokens."})
    kl_samples: int = field(default=2, metadata={"help": "Samples per prompt for the KL(pi_r || pi_base) estimate."})
    report_prompts: int = field(default=4, metadata={"help": "Fixed prompts shown side by side in report.md."})
    shards: int = field(
        default=1, metadata={"help": "Luigi tasks a round's evaluation is split into, each on one GPU (the held-out "
                                     "prompts dealt out in order); figures are the same whatever the number of workers."}
    )
    judge_model: str | None = field(
        default=None,
        metadata={"help": "The referee's model, apart from the training judge: a PairRM or reward model (evaluation.judge "
                          "pairrm, reward_model) or a causal LM as self-judge (evaluation.judge self); null: judge.model, "
                          "or the base model for self. report.md gives both judges' agreement."},
    )
    benchmarks: list = field(
        default_factory=list,
        metadata={"help": "lm-evaluation-harness tasks run on every round's policy (a Benchmark task each, pip install -e "
                          "'.[eval]'): a task name or a local task YAML (relative to where the command runs), or "
                          "{task, num_fewshot, limit, batch_size, apply_chat_template}; may be added to a finished run."},
    )

    def check(self, where: str) -> None:
        _check_bounds(where, "evaluation", self, positive=("num_prompts", "max_new_tokens", "kl_samples", "shards"),
                      non_negative=("report_prompts",))

TRACKERS = ("tensorboard", "mlflow", "wandb", "trackio")
DEMO_BASE = "demo"  # model.base_model naming the shipped demo base (tasks/base_model.py)


@dataclass
class TrackingConfig:
    """Experiment trackers the run logs to (data/tracking.py); they change nothing the run computes, so a run
    directory may start, stop or change its tracking between commands."""

    backends: list[str] = field(
        default_factory=list,
        metadata={"help": "Any of tensorboard, mlflow, wandb, trackio (pip install -e \".[tracking]\"); [] = none. One tracker "
                          "run per selfplay run: every training step, every round's held-out figures, the recipe, the greedy answers."},
    )
    project: str = field(default="selfplay", metadata={"help": "The tracker's project (MLflow experiment, wandb/trackio project)."})
    run_name: str | None = field(default=None, metadata={"help": "The tracker run's name; null: the run directory's name."})
    send_seconds: float = field(
        default=2.0,
        metadata={"help": "Training steps go to the trackers in batches, at most this often (0: each step as it ends); "
                          "steps a killed run held unsent go with the resumed run's first batch."},
    )
    dir: str | None = field(
        default=None,
        metadata={"help": "Where the local stores live (tensorboard/, mlflow.db, wandb/, trackio/); null: <runs-dir>/tracking. "
                          "MLFLOW_TRACKING_URI, WANDB_MODE=online and TRACKIO_DIR point the clients elsewhere."},
    )


@dataclass
class IterateConfig:
    """Which round the run keeps and when it stops, judged on the validation split (data.validation)."""

    select: Literal["best", "last"] = field(
        default="best",
        metadata={"help": "best: runs/<run>/best/ is the round with the best validation figure (round 0, the base, "
                          "included); last: the last round run."},
    )
    select_by: Literal["accuracy", "win_rate_vs_best", "gt_logprob"] | None = field(
        default=None,
        metadata={"help": "The validation figure: accuracy (the verifier), win_rate_vs_best (the evaluation judge, "
                          "the round's greedy answers against the best round's), gt_logprob (mean per-token "
                          "log-likelihood of the ground truth; no judge); null: accuracy where the verifier can "
                          "score the validation rows, else win_rate_vs_best where there is a judge, else gt_logprob."},
    )
    min_gain: float = field(
        default=1.0,
        metadata={"help": "A round replaces the best only when its paired validation difference with it exceeds "
                          "this many standard errors."},
    )
    patience: int | None = field(
        default=None,
        metadata={"help": "Stop after this many rounds in a row fail to replace the best (1: a round that does not "
                          "beat the best ends the run); null: never stop early."},
    )
    on_regress: Literal["continue", "restart_from_best"] = field(
        default="continue",
        metadata={"help": "After a round that does not replace the best: continue from it, or restart_from_best: the "
                          "next round generates from, takes its reference from and continues the adapter of the best round."},
    )
    validation_prompts: int = field(
        default=200, metadata={"help": "Validation prompts scored each round: the first N of the validation split."}
    )


@dataclass
class Recipe:
    name: str = field(
        default="demo_spin",
        metadata={"help": "Run directory name under --runs-dir (unless "
                          "--run-name); default: the recipe file's name."},
    )
    algorithm: Algorithm = field(
        default="spin",
        metadata={"help": "spin: the data's response vs the model's own sample (SPIN); sppo: best vs worst of K samples by "
                          "mean win probability, SPPO's loss; dpo: best vs worst of K by the judge (iterative DPO; with "
                          "judge.name: self, Self-Rewarding; with judge.refine, SPaR-style pairs); inpo: those pairs with INPO's "
                          "loss (the previous round and the base as references); dno: DNO-Prct, pairs kept above judge.min_margin; "
                          "rest: the samples that pass the judge as supervised examples (ReST, ReST-EM, STaR)."},
    )
    seed: int = field(
        default=0, metadata={"help": "Seeds the demo model's warm start, sampling, training's batch order and the adapter's initialisation."}
    )
    model: ModelConfig = field(default_factory=ModelConfig)
    demo_model: DemoModelConfig = field(default_factory=DemoModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    evaluation: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    iterate: IterateConfig = field(default_factory=IterateConfig)
    rounds: list[dict] = field(
        default_factory=list,
        metadata={"help": "Per-round partial recipes: entry i is merged over the recipe for round i + 1 (later rounds use "
                          "the recipe as it is). A round may change generation, judge, training (not the LoRA shape: "
                          "lora_r, lora_alpha, lora_target_modules) and evaluation, e.g. rounds: [{training: {learning_rate: "
                          "3.0e-3}}, {training: {learning_rate: 1.0e-3, beta: 0.5}, generation: {temperature: 0.7}}]."},
    )

    def __post_init__(self) -> None:
        where = self.name
        if self.algorithm == "spin" and self.judge.name != "ground_truth":
            raise RecipeError(f"{where}: algorithm spin pairs by ground truth; set judge.name: ground_truth")
        if self.algorithm != "spin" and self.judge.name == "ground_truth":
            raise RecipeError(f"{where}: algorithm {self.algorithm} needs a judge (pairrm, self, reward_model, verifier)")
        if self.algorithm not in ("spin", "rest") and self.generation.num_samples < 2:
            raise RecipeError(f"{where}: generation.num_samples must be >= 2 for {self.algorithm} (it ranks samples)")
        if self.judge.keep_identical and self.algorithm != "spin":
            raise RecipeError(f"{where}: judge.keep_identical applies to algorithm spin only (its chosen side is the dataset's "
                              f"response); {self.algorithm} ranks distinct samples")
        if self.algorithm == "spin" and (self.judge.add_reference or self.judge.min_margin):
            raise RecipeError(f"{where}: judge.add_reference and judge.min_margin rank a judge's candidates; "
                              "algorithm spin has none (its chosen side is always the dataset's response)")
        self._check_refine(where)
        self._check_tracking(where)
        check_evaluation(self, where)
        self._check_rest(where)
        if self.judge.name in ("pairrm", "reward_model") and not self.judge.model:
            raise RecipeError(f"{where}: judge.model is required for judge {self.judge.name}")
        if self.training.loss == "sppo" and self.algorithm != "sppo":
            raise RecipeError(f"{where}: training.loss sppo needs the win probabilities of algorithm sppo")
        # Each section checks its own bounds, then what ties two sections together.
        for section in (self.demo_model, self.data, self.generation, self.judge, self.training, self.evaluation):
            section.check(where)
        t, g = self.training, self.generation
        if t.label_smoothing and self.loss not in ("dpo_sigmoid", "robust"):
            raise RecipeError(
                f"{where}: training.label_smoothing applies to losses dpo_sigmoid (cDPO) and robust only; loss {self.loss} would ignore it"
            )
        # Every prompt must fit beside a full-length sample in a training sequence (see prompt_token_limit).
        if g.max_new_tokens >= t.max_length:
            raise RecipeError(
                f"{where}: generation.max_new_tokens ({g.max_new_tokens}) leaves no room for a prompt in training.max_length ({t.max_length})"
            )
        self._check_inpo(where)
        self._check_rounds_kept(where)
        self._check_mix_and_reference(where)

    def _check_refine(self, where: str) -> None:
        j = self.judge
        if not j.refine:
            if j.refine_prompt is not None:
                raise RecipeError(f"{where}: judge.refine_prompt applies with judge.refine: true only")
            if j.pass_score is not None and self.algorithm != "rest":
                raise RecipeError(f"{where}: judge.pass_score applies with judge.refine: true only, or algorithm rest")
            return
        # A refined answer is scored alone, so the judge must score responses one by one; and its pair is
        # ranked by those scores, which SPPO's and DNO's win rates over the K samples are not.
        if self.algorithm not in ("dpo", "inpo"):
            raise RecipeError(f"{where}: judge.refine makes pairs ranked by the judge's scores: algorithm dpo or inpo, "
                              f"not {self.algorithm}")
        if j.name == "pairrm" or (j.name == "self" and j.self_mode == "pairwise"):
            raise RecipeError(f"{where}: judge.refine needs a judge that scores each response (verifier, reward_model, "
                              "or self with self_mode pointwise)")
        if j.pass_score is None and j.name != "verifier":
            raise RecipeError(f"{where}: judge.refine with judge {j.name} needs judge.pass_score (the score that passes)")
        template = j.refine_prompt
        if template is not None:
            if "{prompt}" not in template or "{response}" not in template:
                raise RecipeError(f"{where}: judge.refine_prompt must contain {{prompt}} and {{response}}")
            try:
                template.format(prompt="", response="")
            except (KeyError, IndexError, ValueError) as exc:
                raise RecipeError(f"{where}: judge.refine_prompt: {exc!r}; write other braces as {{{{ and }}}}") from None

    def _check_tracking(self, where: str) -> None:
        backends = self.tracking.backends
        for name in backends:
            if name not in TRACKERS:
                raise RecipeError(f"{where}: tracking.backends: unknown tracker {name!r} (known: {', '.join(TRACKERS)})")
        if len(set(backends)) < len(backends):
            raise RecipeError(f"{where}: tracking.backends names a tracker twice: {backends}")
        if self.tracking.send_seconds < 0:
            raise RecipeError(f"{where}: tracking.send_seconds must be >= 0, got {self.tracking.send_seconds}")

    def _check_rest(self, where: str) -> None:
        """algorithm rest: a judge that scores each response, a threshold within its scores, and STaR's hint template."""
        j, t = self.judge, self.training
        if self.algorithm != "rest":
            for key, value, off in (("judge.max_per_prompt", j.max_per_prompt, None), ("judge.rationalize", j.rationalize, False)):
                if value != off:
                    raise RecipeError(f"{where}: {key} applies to algorithm rest only")
            if t.loss == "nll":
                raise RecipeError(f"{where}: training.loss nll fits the examples of algorithm rest; {self.algorithm} trains on pairs")
        else:
            # Each sample passes or fails on its own score, so the judge must give one per response.
            if j.name == "pairrm" or (j.name == "self" and j.self_mode == "pairwise"):
                raise RecipeError(f"{where}: algorithm rest keeps the samples whose own score passes judge.pass_score: it needs "
                                  "a judge that scores each response (verifier, reward_model, or self with self_mode "
                                  f"pointwise), not {'pairrm' if j.name == 'pairrm' else 'self with self_mode pairwise'}")
            if j.pass_score is None and j.name != "verifier":
                raise RecipeError(f"{where}: algorithm rest with judge {j.name} needs judge.pass_score (the score a kept "
                                  "sample reaches: ReST's threshold)")
            if t.loss not in (None, "nll"):
                raise RecipeError(f"{where}: algorithm rest fits its examples by their likelihood (training.loss nll), "
                                  f"not {t.loss}: it makes no pairs")
            for key, value, off in (("judge.add_reference", j.add_reference, False), ("judge.min_margin", j.min_margin, 0.0),
                                    ("judge.refine", j.refine, False), ("training.nll_weight", t.nll_weight, 0.0)):
                if value != off:
                    raise RecipeError(f"{where}: {key} shapes preference pairs; algorithm rest makes none "
                                      "(judge.rationalize is its way to learn where no sample passes)")
        if j.pass_score is not None and j.name in SCORE_RANGE:
            low, high = SCORE_RANGE[j.name]
            if not low <= j.pass_score <= high:
                raise RecipeError(f"{where}: judge.pass_score {j.pass_score:g} is outside the scores judge {j.name} gives "
                                  f"([{low:g}, {high:g}]): " + ("no response could ever pass" if j.pass_score > high
                                                                 else "every response would pass"))
        if not j.rationalize:
            if j.rationalize_prompt is not None:
                raise RecipeError(f"{where}: judge.rationalize_prompt applies with judge.rationalize: true only")
            return
        template = j.rationalize_prompt
        if template is not None:
            if "{prompt}" not in template or "{answer}" not in template:
                raise RecipeError(f"{where}: judge.rationalize_prompt must contain {{prompt}} and {{answer}} (the hint)")
            try:
                template.format(prompt="", answer="")
            except (KeyError, IndexError, ValueError) as exc:
                raise RecipeError(f"{where}: judge.rationalize_prompt: {exc!r}; write other braces as {{{{ and }}}}") from None

    def _check_rounds_kept(self, where: str) -> None:
        """iterate: which round is kept and when the run stops, each needing a validation split."""
        it, data = self.iterate, self.data
        if it.patience is not None and it.patience < 1:
            raise RecipeError(f"{where}: iterate.patience must be at least 1 (rounds in a row that fail to beat the best), "
                              f"got {it.patience}; null turns early stopping off")
        if it.min_gain < 0:
            raise RecipeError(f"{where}: iterate.min_gain must be >= 0 (standard errors), got {it.min_gain}")
        if it.validation_prompts <= 0:
            raise RecipeError(f"{where}: iterate.validation_prompts must be positive, got {it.validation_prompts}")
        if not 0 <= data.validation_fraction < 1:
            raise RecipeError(f"{where}: data.validation_fraction must be in [0, 1), got {data.validation_fraction}")
        if self.no_validation:
            for key, value, off in (("iterate.select", it.select, "last"), ("iterate.patience", it.patience, None),
                                    ("iterate.on_regress", it.on_regress, "continue")):
                if value != off:
                    why = ("data.validation is none" if data.validation == "none" else
                           "data.validation is null and data.validation_fraction 0 sets no training prompt aside")
                    raise RecipeError(f"{where}: {key}: {value} needs a validation split: {why}")

    @property
    def no_validation(self) -> bool:
        """Whether the recipe turns the validation split off: data.validation none, or null with nothing set aside
        from a local training file (the demo's data has a split of its own, and a hub dataset may)."""
        data = self.data
        if data.validation == "none":
            return True
        local_file = not data.train.startswith("demo:") and data.train.endswith((".parquet", ".jsonl", ".json"))
        return data.validation is None and data.validation_fraction == 0 and local_file

    def _check_mix_and_reference(self, where: str) -> None:
        t = self.training
        if t.mix_rounds is not None:
            if t.mix_previous_round is not None:
                raise RecipeError(f"{where}: training.mix_previous_round is the older spelling of training.mix_rounds; set one")
            for i, share in enumerate(t.mix_rounds):
                if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 <= share <= 1:
                    raise RecipeError(f"{where}: training.mix_rounds[{i}] must be a share in [0, 1], got {share!r}")
        if t.reference_ema is not None:
            if t.reference != "ema":
                raise RecipeError(f"{where}: training.reference_ema applies to training.reference: ema only")
            if not 0 <= t.reference_ema < 1:
                raise RecipeError(f"{where}: training.reference_ema must be in [0, 1), got {t.reference_ema}")
        if t.reference != "previous" and self.loss in ("simpo", "nll"):
            raise RecipeError(f"{where}: training.reference {t.reference}: loss {self.loss} has no reference model")
        if t.accumulate and (t.mix_rounds is not None or t.mix_previous_round is not None):
            raise RecipeError(f"{where}: training.accumulate is training.mix_rounds with 1.0 for every earlier round; set one")
        if t.init == "base" and t.reference == "ema":
            # The average is taken weight by weight over one continued adapter; a fresh adapter shares none with it.
            raise RecipeError(f"{where}: training.reference ema averages one adapter continued across rounds; with "
                              "training.init base each round starts a fresh one: use reference previous or base")

    @property
    def pass_score(self) -> float | None:
        """The score at which a response passes the judge (judge.refine): judge.pass_score, or 0.5 for the
        verifier (a right answer, as the evaluation's accuracy counts it)."""
        if self.judge.pass_score is not None:
            return self.judge.pass_score
        return 0.5 if self.judge.name == "verifier" else None

    def _check_inpo(self, where: str) -> None:
        t = self.training
        if self.loss != "inpo":
            for key in ("inpo_eta", "inpo_tau"):
                if getattr(t, key) is not None:
                    raise RecipeError(f"{where}: training.{key} applies to loss inpo only; loss {self.loss} would ignore it")
            return
        if t.inpo_eta is not None and t.inpo_eta <= 0:
            raise RecipeError(f"{where}: training.inpo_eta must be positive, got {t.inpo_eta}")
        if t.inpo_tau is not None and t.inpo_tau < 0:
            raise RecipeError(f"{where}: training.inpo_tau must be >= 0, got {t.inpo_tau}")
        # The mirror-descent step mixes pi_{r-1}^(1 - eta tau) pi_0^(eta tau): outside [0, 1] it is no mixture.
        eta, tau = self.inpo_eta_tau
        if eta * tau > 1:
            raise RecipeError(f"{where}: INPO needs eta * tau in [0, 1]; training.inpo_eta {eta:g} * training.inpo_tau "
                              f"{tau:g} = {eta * tau:g}")

    @property
    def inpo_eta_tau(self) -> tuple[float, float]:
        """INPO's (eta, tau) with their defaults: eta = 1 / beta, since the authors' released trainer passes
        its 1/eta as the DPO trainer's beta (the convention SPPO's eta = 1/beta follows here too); tau such
        that eta * tau = 1/3, the `ratio` of their released run script."""
        eta = self.training.inpo_eta if self.training.inpo_eta is not None else 1.0 / self.training.beta
        tau = self.training.inpo_tau if self.training.inpo_tau is not None else INPO_DEFAULT_ETA_TAU / eta
        return eta, tau

    @property
    def prompt_token_limit(self) -> int:
        """Longest prompt (chat-formatted, in tokens) a round samples from: data.max_prompt_tokens, but
        never more than training.max_length - generation.max_new_tokens, so every prompt fits beside a
        full-length sample and training never has to cut a prompt (models/logps.py, encode_pair).
        Longer prompts are dropped or refused by data.overlong_prompts."""
        return min(self.data.max_prompt_tokens, self.training.max_length - self.generation.max_new_tokens)

    @property
    def needs_reference(self) -> bool:
        """Whether every training prompt needs the dataset's response: SPIN's chosen side, or a candidate
        the judge ranks (judge.add_reference)."""
        return self.algorithm == "spin" or self.judge.add_reference

    @property
    def loss(self) -> str:
        return self.training.loss or {"sppo": "sppo", "inpo": "inpo", "rest": "nll"}.get(self.algorithm, "dpo_sigmoid")

    @property
    def mix_rounds(self) -> list[float]:
        """The share of each earlier round's pairs this round adds (entry k: the round k + 1 before it).

        SPIN's official recipe trains iteration t on its synthetic set plus iteration t-1's (uclaml/SPIN),
        hence [1.0] for SPIN; the older `mix_previous_round: true` means the same. `training.accumulate` (STaR's
        outer loop trains on everything collected) is 1.0 for every earlier round: EVERY_ROUND entries, more than
        any run has rounds (the rounds a round descends from bound what is read)."""
        t = self.training
        if t.accumulate:
            return [1.0] * EVERY_ROUND
        if t.mix_rounds is not None:
            return [float(share) for share in t.mix_rounds]
        mix = self.algorithm == "spin" if t.mix_previous_round is None else t.mix_previous_round
        return [1.0] if mix else []

    @property
    def mix_previous_round(self) -> bool:
        return bool(self.mix_rounds) and self.mix_rounds[0] > 0

    @property
    def reference_ema(self) -> float:
        return 0.5 if self.training.reference_ema is None else self.training.reference_ema

    def for_round(self, round_idx: int) -> "Recipe":
        """The recipe with `rounds[round_idx - 1]` merged over it (rounds past the list use the defaults)."""
        if round_idx < 1 or round_idx > len(self.rounds):
            return self
        merged = deep_merge(self.to_dict(), self.rounds[round_idx - 1])
        merged["rounds"] = []
        where = f"{self.name} rounds[{round_idx - 1}]"
        try:
            return recipe_from_dict(merged, where)
        except RecipeError as exc:  # a rule broken by the round's values: say which round
            message, own = str(exc), f"{self.name}: "
            raise RecipeError(f"{where}: {message[len(own):]}" if message.startswith(own) else message) from None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


INPO_DEFAULT_ETA_TAU = 1 / 3
# The scores a judge gives one response, where they are bounded: a verifier's [0, 1] (models/judge/verifiers.py), the
# pointwise self-judge's 5-point rubric (models/judge/judges.py). A reward model's are any real number.
SCORE_RANGE = {"verifier": (0.0, 1.0), "self": (0.0, 5.0)}
EVERY_ROUND = 10_000
ROUND_OVERRIDABLE = {"generation", "judge", "training", "evaluation"}
# Every round continues one LoRA adapter (models/load/loading.py), so its shape is fixed for the run.
LORA_SHAPE = ("lora_r", "lora_alpha", "lora_target_modules")


def deep_merge(base: dict, override: dict) -> dict:
    """`override` merged over `base`, section by section at every depth, as a new dict: neither input
    is changed, and the result shares no nested dict or list with them (so changing it changes neither)."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


# PyYAML reads YAML 1.1, where a float needs a dot: `learning_rate: 2e-5` arrives as the string '2e-5'.
_EXPONENT_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _accepts_float(annotation: Any) -> bool:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(_accepts_float(arg) for arg in typing.get_args(annotation))
    return annotation is float


def _type_ok(value: Any, annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, arg) for arg in typing.get_args(annotation))
    if origin is Literal:
        return value in typing.get_args(annotation)
    if origin is list:
        return isinstance(value, list)
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, annotation)


def _describe(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return "one of " + ", ".join(map(repr, typing.get_args(annotation)))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in typing.get_args(annotation))
    return getattr(annotation, "__name__", str(annotation)).replace("NoneType", "null")


def _build(cls: type, data: Any, where: str, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: {prefix.rstrip('.') or 'the recipe'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f" (known: {', '.join(names)})"
            raise RecipeError(f"{where}: unknown key '{prefix}{key}'{hint}")
        annotation = hints[key]
        if isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(value) and _accepts_float(annotation):
            value = float(value)
        if dataclasses.is_dataclass(annotation):
            kwargs[key] = _build(annotation, value or {}, where, f"{prefix}{key}.")
        elif not _type_ok(value, annotation):
            raise RecipeError(f"{where}: '{prefix}{key}' must be {_describe(annotation)}, got {value!r}")
        else:
            kwargs[key] = float(value) if annotation is float else value
    return cls(**kwargs)


def recipe_from_dict(data: dict, where: str = "recipe") -> Recipe:
    recipe = _build(Recipe, data, where, "")
    for i, entry in enumerate(recipe.rounds):
        if not isinstance(entry, dict):
            raise RecipeError(f"{where}: rounds[{i}] must be a mapping")
        for key in entry:
            if key not in ROUND_OVERRIDABLE:
                raise RecipeError(
                    f"{where}: rounds[{i}].{key} cannot change between rounds (allowed: {', '.join(sorted(ROUND_OVERRIDABLE))})"
                )
        for key in LORA_SHAPE:
            if isinstance(entry.get("training"), dict) and key in entry["training"]:
                raise RecipeError(
                    f"{where}: rounds[{i}].training.{key} cannot change between rounds "
                    "(every round continues the same LoRA adapter; set it once under training:)"
                )
        recipe.for_round(i + 1)  # validates the merged round now, not hours later
    return recipe


def shipped_recipes() -> list[str]:
    """The names of the recipes shipped in this package's configs/ (installed with it)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def resolve_recipe(path: str | Path) -> Path:
    """The recipe file `path` names: a file of that path (from the working directory) first; else a shipped
    recipe, by name (`smollm2_spin_cpu`, with or without `.yaml`) or by its path in the repository
    (`configs/smollm2_spin_cpu.yaml`), so the README's commands work from any directory once installed."""
    given = Path(path).expanduser()
    if given.is_file():
        return given
    name = given.name if given.parent in (Path("."), Path("configs")) else None
    if name:
        shipped = CONFIG_DIR / (name if name.endswith((".yaml", ".yml")) else f"{name}.yaml")
        if shipped.is_file():
            return shipped
    raise RecipeError(f"recipe {path} not found: no such file, and no shipped recipe of that name "
                      f"(shipped: {', '.join(shipped_recipes())}; `python -m configs.recipe --list` describes them)")


def recipe_summary(path: Path) -> str:
    """The first sentence of a recipe file's leading comment: what it runs."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        text = line.lstrip("#").strip()
        if text.startswith(("luigi ", "python ")):
            break
        lines.append(text)
    # The first sentence: up to a full stop that ends no abbreviation ("et al.", "i.e.", "e.g.").
    return re.split(r"(?<!\bal)(?<!\be\.g)(?<!\bi\.e)\.(?:\s|$)", " ".join(lines), maxsplit=1)[0]


def load_recipe(path: str | Path) -> Recipe:
    path = resolve_recipe(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from None
    data.setdefault("name", path.stem)
    return recipe_from_dict(data, str(path))


def recipe_fields(recipe: Recipe | None = None) -> list[dict]:
    """Every key of a recipe, dotted ('training.beta'), in the order of the dataclasses: its type, default
    and help, and `recipe`'s value when one is given."""
    values = recipe.to_dict() if recipe is not None else None
    rows = []

    def walk(cls: type, prefix: str, section_values: dict | None) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            annotation = hints[f.name]
            value = None if section_values is None else section_values.get(f.name)
            if dataclasses.is_dataclass(annotation):
                walk(annotation, f"{prefix}{f.name}.", value)
                continue
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            row = {"key": prefix + f.name, "type": _describe(annotation), "default": default, "help": f.metadata.get("help", "")}
            if section_values is not None:
                row["value"] = value
            rows.append(row)

    walk(Recipe, "", values)
    return rows


def _yaml_value(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("\n...").strip()


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m configs.recipe", description="What each key of a recipe means, "
                                     "and which recipes ship with the package.")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--fields", action="store_true", help="list every key with its type, default and help")
    what.add_argument("--list", action="store_true",
                      help="list the shipped recipes, each usable as --recipe NAME from any directory")
    parser.add_argument("recipe", nargs="?", help="a recipe (file or shipped name) whose values are shown beside the defaults")
    args = parser.parse_args(argv)
    if args.list:
        for name in shipped_recipes():
            print(f"{name}: {recipe_summary(CONFIG_DIR / f'{name}.yaml')}")
        return 0
    recipe = load_recipe(args.recipe) if args.recipe else None
    for row in recipe_fields(recipe):
        line = f"{row['key']}: {row['type']} = {_yaml_value(row['default'])}"
        if "value" in row and row["value"] != row["default"]:
            line += f"  ({resolve_recipe(args.recipe).name}: {_yaml_value(row['value'])})"
        print(line)
        print(f"    {row['help']}")
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except RecipeError as exc:
        raise SystemExit(f"selfplay: {exc}") from None
