"""The three tasks of a round, and how rounds link: Generate(r) -> Judge(r) -> Train(r) -> Generate(r + 1).

The model after round r is Train(r)'s checkpoint, and after round 0 the base model (`model_task`).
Generate(r) samples with the model after round r-1, so Train(r-1) is what Generate(r) requires and
Train(r) requires Judge(r) requires Generate(r): the round graph is recursive, and the three tasks live
in this one module so that each names the others directly.

Generate(r): sample responses to round r's prompts with the model after round r-1.

    luigi --module pipeline Generate --round-idx 1

Writes round_NN/generations.parquet (prompt_id, prompt, response, sample_index, round, num_tokens,
plus reference/task/answer/source_row/system) and round_NN/generate_meta.json. Parts of the work are kept in
round_NN/generate_work/ so a killed run resumes where it stopped (models/generate/generation.py).

The sampling is done by `generation.shards` GenerateShard(r, i) tasks, each with its block of the round's
parts on GPUs of its own (round_NN/generations.shards/shard-NNNNN.parquet and .json); Generate(r) puts
them together in order. A part's samples depend on its index alone, so the artifact is the same whatever
the number of shards or workers (README: Several GPUs and several boxes).

Judge(r): turn round r's samples into preference pairs.

    luigi --module pipeline Judge --round-idx 1

SPIN pairs the ground truth (chosen) with the model's sample (rejected); SPPO and iterative DPO ask
the recipe's judge for every prompt's K x K win-probability matrix and keep best vs worst
(models/judge/judges.py). With judge.refine, the round's generator also rewrites answers that fail the
judge (SPaR-style refinement pairs). Writes round_NN/pairs.parquet and round_NN/judge_meta.json (pairs
made, ties and identical pairs skipped, judge answers that could not be parsed, refinements tried and
passed). Algorithm rest makes no pairs: the samples that pass the judge (and, with judge.rationalize, the
generator's hinted answers that pass) are written to round_NN/selected.parquet as supervised examples
(models/judge/self_training.py). The judging is done by `judge.shards` JudgeShard(r, i) tasks, each with its block of the
round's prompts (round_NN/pairs.shards/); Judge(r) puts their pairs together in order and adds up their
counts.

Train(r): continue the policy's LoRA adapter on round r's preference pairs, with round r-1 as the reference.

    luigi --module pipeline Train --round-idx 1

Loads the root weights plus round r-1's adapter (the policy after round r-1; a fresh adapter in round
1, and in every round with `training.init: base`), trains with the recipe's DPO-family loss
(models/train/trainer.py) on round r's pairs (algorithm rest: its examples, by their likelihood) plus the share
`training.mix_rounds` (or `accumulate`) takes of earlier rounds', and writes round_NN/checkpoint/:
adapter/ (the policy), the merged export, tokenizer, training_log.json and, last, _SUCCESS.
Trainer checkpoints live in round_NN/train_work/; a killed run resumes from the newest one.

With `training.launcher: accelerate` the task starts `accelerate launch --num_processes N` on the
same code (DDP; see the README for FSDP) and waits for it.

Validate(r): the model after round r (r = 0: the base) scored on the validation split.

    luigi --module pipeline Validate --round-idx 1

Writes round_NN/validation.parquet: per validation prompt the greedy answer, its verifier score and the
ground truth's mean per-token log-likelihood, as iterate.select_by needs (models/evaluate/selection.py).

Select(r): what round r's validation figures decide (data/selection.py).

    luigi --module pipeline Select --round-idx 1

Compares round r with the best round so far, paired over the validation prompts, and writes
round_NN/selection.json: whether round r is the new best, the round the run keeps (best/ and best.json,
switched together), whether the run stops (iterate.patience) and which round the next one continues
(iterate.on_regress). Select(r) requires Select(r-1), so each decision is taken once its predecessors'
are written.

Which round a round continues. With `iterate.on_regress: continue` round r continues round r-1, named in
requires() like any input. With `restart_from_best` it continues the round Select(r-1) chose, which is
not known until Select(r-1) has run; so Generate(r), Judge(r) and Train(r) require Select(r-1) (which
itself requires every earlier round) and read the parent from its record when they run
(`parent_of`). requires() stays the same whatever the record says, so Luigi's graph is deterministic;
a task run alone (`luigi --module pipeline Train --round-idx 3`) runs the selections before it first;
deleting a round's files reruns its Select and every round after it, whose parents may then change.
"""

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import luigi

from common import interrupt
from common.atomic import atomic_write_json
from common.errors import Interrupted, RecipeError, TrainingError
from tasks.base import (DirTarget, FileTarget, GpuTask, RunTask, ShardTask, prepare_shared_work_dir, prepare_work_dir,
                        read_shard_parts, set_cpu_threads)
from tasks.base_model import BaseModel

if TYPE_CHECKING:  # annotations only: pandas loads inside the functions that use it
    import pandas as pd


def model_task(task, round_idx: int):
    """The task whose output is the model after `round_idx` rounds, with `task`'s run parameters."""
    return task.clone(BaseModel) if round_idx == 0 else task.clone(Train, round_idx=round_idx)


def restarts(task) -> bool:
    """Whether a round's parent depends on the selection before it (iterate.on_regress: restart_from_best)."""
    return task.config.iterate.on_regress == "restart_from_best"


def parent_requirement(task, round_idx: int):
    """What round `round_idx`'s tasks require to know and load the model they continue: that model's task, or
    with restart_from_best the selection that names it (and, through it, every earlier round)."""
    if round_idx > 1 and restarts(task):
        return task.clone(Select, round_idx=round_idx - 1)
    return model_task(task, round_idx - 1)


def parent_of(task, round_idx: int):
    """The task of the model round `round_idx` continues, once its requirement is complete (in run())."""
    from data.selection import parent_round

    return model_task(task, parent_round(task.config, task.layout, round_idx))


class GenerateShard(ShardTask, GpuTask):
    """One shard of Generate(r): its block of the round's parts (generation.shards), on GPUs of its own."""

    round_idx = luigi.IntParameter(description="Round number, from 1.")
    shard_idx = luigi.IntParameter(description="Shard number, from 0 (of generation.shards).")

    @property
    def resources(self):
        gen = self.config.for_round(self.round_idx).generation
        return {"gpu": gen.tensor_parallel_size if gen.backend == "vllm" else 1}

    def requires(self):
        return parent_requirement(self, self.round_idx)

    def output(self):
        part, meta = self.layout.generation_shard(self.round_idx, self.shard_idx)
        return {"part": FileTarget(str(part)), "meta": FileTarget(str(meta))}

    def run(self):
        set_cpu_threads()
        from data.prompts import load_prompts, round_prompts
        from data.validation import training_prompts
        from models.generate.generation import generate_round
        from tasks.requirements import check_train_data

        recipe = self.config.for_round(self.round_idx)
        parent = parent_of(self, self.round_idx)
        with self.hold_gpus(self.resources["gpu"]):
            prompts = load_prompts(
                recipe.data.train, recipe.data.train_split, recipe.data, require_reference=recipe.needs_reference
            )
            check_train_data(recipe, prompts, recipe.data.train)  # a hub dataset was not read before scheduling
            prompts = round_prompts(training_prompts(recipe, prompts), self.round_idx, recipe.data.prompts_per_round)
            work_dir = prepare_shared_work_dir(self.layout.generate_work(self.round_idx), luigi.task.flatten(parent.output()))
            try:
                frame, stats = generate_round(
                    recipe, parent.model_path, prompts, self.round_idx, work_dir,
                    root_path=model_task(self, 0).model_path, shard=(self.shard_idx, recipe.generation.shards),
                )
            finally:
                if recipe.generation.backend == "vllm":  # one engine per shard: its GPUs are free for what runs next
                    from models.generate.vllm_engine import release_vllm

                    release_vllm()
        stats["parent_round"] = getattr(parent, "round_idx", 0)
        self.write_part(frame, stats)


class Generate(RunTask):
    """Round r's generations: its shards' parts put together in order (no GPU; the shards did the work)."""

    round_idx = luigi.IntParameter(description="Round number, from 1.")

    def requires(self):
        shards = self.config.for_round(self.round_idx).generation.shards
        return [self.clone(GenerateShard, shard_idx=i) for i in range(shards)]

    def output(self):
        return {
            "generations": FileTarget(str(self.layout.generations(self.round_idx))),
            "meta": FileTarget(str(self.layout.generate_meta(self.round_idx))),
        }

    def run(self):
        from data.schema import GENERATIONS, write_parquet
        from models.generate.generation import generation_stats

        frame, metas = merge_shards(self.input())
        stats = generation_stats(frame, metas[0]["prompts"], metas[0]["prompts_too_long"])
        stats["parent_round"] = metas[0].get("parent_round", self.round_idx - 1)
        with self.output()["generations"].temporary_path() as tmp:
            write_parquet(frame, tmp, GENERATIONS)
        with self.output()["meta"].temporary_path() as tmp:
            atomic_write_json(tmp, stats)


class JudgeShard(ShardTask, GpuTask):
    """One shard of Judge(r): its block of the round's prompts (judge.shards), on a GPU of its own."""

    round_idx = luigi.IntParameter(description="Round number, from 1.")
    shard_idx = luigi.IntParameter(description="Shard number, from 0 (of judge.shards).")

    def requires(self):
        return {"generations": self.clone(Generate), "model": parent_requirement(self, self.round_idx)}

    def output(self):
        part, meta = self.layout.pairs_shard(self.round_idx, self.shard_idx)
        return {"part": FileTarget(str(part)), "meta": FileTarget(str(meta))}

    def run(self):
        set_cpu_threads()
        from data.layout import shard_range
        from data.schema import GENERATIONS, read_artifact
        from models.judge.judges import make_judge, pair_round

        recipe = self.config.for_round(self.round_idx)
        generations = read_artifact(self.input()["generations"]["generations"].path, GENERATIONS)
        prompt_ids = generations.prompt_id.drop_duplicates()
        shard_prompt_ids = prompt_ids.iloc[list(shard_range(len(prompt_ids), self.shard_idx, recipe.judge.shards))]
        generations = generations[generations.prompt_id.isin(shard_prompt_ids)]
        judge = refiner = None
        who = {}
        with self.hold_gpus(1):
            if recipe.algorithm != "spin":
                from models.load.loading import load_policy, load_tokenizer

                generator_path, base_path = parent_of(self, self.round_idx).model_path, model_task(self, 0).model_path
                loaded = {}

                def model_at(path: str):
                    """(tokenizer, model) at `path`, loaded once however many roles it plays."""
                    if path not in loaded:
                        loaded[path] = (load_tokenizer(path, recipe.model),
                                        load_policy(path, recipe.model, quantize=recipe.model.quantization == "4bit", root=base_path))
                    return loaded[path]

                model = tokenizer = None
                if recipe.judge.name == "self":
                    # judge.self_model: policy = the round's generator (the model after round r-1) judges its own
                    # samples, as in Self-Rewarding LMs; base = the base model judges every round.
                    judge_path = generator_path if recipe.judge.self_model == "policy" else base_path
                    tokenizer, model = model_at(judge_path)
                    who = {"judge_model": str(judge_path), "generator_model": str(generator_path),
                           "judge_is_generator": judge_path == generator_path}
                judge = make_judge(recipe.judge.name, recipe, model, tokenizer)
                if recipe.judge.refine:  # the generator rewrites its own failed answers
                    from models.judge.judges import make_refiner

                    refiner_tokenizer, refiner_model = model_at(generator_path)
                    refiner = make_refiner(recipe, refiner_model, refiner_tokenizer, self.round_idx, self.shard_idx)
                if recipe.judge.rationalize:  # STaR: the generator answers again, given the answer as a hint
                    from models.judge.self_training import make_rationalizer

                    refiner_tokenizer, refiner_model = model_at(generator_path)
                    refiner = make_rationalizer(recipe, refiner_model, refiner_tokenizer, self.round_idx, self.shard_idx)
            if recipe.algorithm == "rest":
                from models.judge.self_training import select_round

                pairs, stats = select_round(recipe, generations, self.round_idx, judge, refiner)
            else:
                pairs, stats = pair_round(recipe, generations, self.round_idx, judge, refiner)
        stats.update(who)
        self.write_part(pairs, stats)


class Judge(RunTask):
    """Round r's pairs (selected.parquet's examples for algorithm rest): its shards' parts put together in order,
    their counts added up."""

    round_idx = luigi.IntParameter(description="Round number, from 1.")

    def requires(self):
        shards = self.config.for_round(self.round_idx).judge.shards
        return [self.clone(JudgeShard, shard_idx=i) for i in range(shards)]

    def output(self):
        if self.config.algorithm == "rest":
            made = {"selected": FileTarget(str(self.layout.selected(self.round_idx)))}
        else:
            made = {"pairs": FileTarget(str(self.layout.pairs(self.round_idx)))}
        return {**made, "meta": FileTarget(str(self.layout.judge_meta(self.round_idx)))}

    def run(self):
        from data.schema import PAIRS, SELECTED, write_parquet

        frame, metas = merge_shards(self.input())
        counts = add_counts(metas)
        key, schema = ("selected", SELECTED) if self.config.algorithm == "rest" else ("pairs", PAIRS)
        if key == "selected":
            from models.judge.self_training import finish_counts

            counts = finish_counts(counts)
        with self.output()[key].temporary_path() as tmp:
            write_parquet(frame, tmp, schema)
        with self.output()["meta"].temporary_path() as tmp:
            atomic_write_json(tmp, counts)


GenerateShard.merge_family, JudgeShard.merge_family = Generate, Judge


def merge_shards(shard_outputs: list[dict]) -> tuple["pd.DataFrame", list[dict]]:
    """The shards' parts concatenated in shard order (empty parts skipped: a shard with nothing to do), and
    their stats."""
    import pandas as pd

    kept, metas = read_shard_parts(shard_outputs)
    return pd.concat(kept, ignore_index=True) if len(kept) > 1 else kept[0], metas


def add_counts(metas: list[dict]) -> dict:
    """The stats of several shards as one: counts added up, anything else (who judged) from the first shard
    that has it; keys in the order they first appear."""
    merged: dict = {}
    for meta in metas:
        for key, value in meta.items():
            if key not in merged:
                merged[key] = value
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                merged[key] += value
    return merged


class Train(GpuTask):
    round_idx = luigi.IntParameter(description="Round number, from 1.")

    def requires(self):
        deps = {"pairs": self.clone(Judge), "parent": parent_requirement(self, self.round_idx), "base": model_task(self, 0)}
        mix = self.config.for_round(self.round_idx).mix_rounds
        if self.round_idx > 1 and mix and not restarts(self):
            # The rounds this one continues are the ones before it; with restart_from_best they are read from the
            # selections, which the parent requirement already brings in with every earlier round's pairs.
            deps["mixed_pairs"] = [self.clone(Judge, round_idx=self.round_idx - 1 - k)
                                   for k in range(min(len(mix), self.round_idx - 1))]
        return deps

    def output(self):
        return DirTarget(str(self.layout.checkpoint(self.round_idx)))

    @property
    def model_path(self) -> str:
        return self.output().path

    def run(self):
        set_cpu_threads()
        from data.selection import lineage
        from models.load.loading import check_same_root

        recipe = self.config.for_round(self.round_idx)
        parent_task = parent_of(self, self.round_idx)
        parent = parent_task.model_path
        root_model = self.requires()["base"].root_model
        root_path = self.requires()["base"].model_path
        check_same_root(parent, root_model)
        # This round's pairs (algorithm rest: examples) whole, then the share training.mix_rounds (or accumulate)
        # takes of each round it descends from.
        rest = recipe.algorithm == "rest"
        examples = self.input()["pairs"]["selected" if rest else "pairs"]
        pair_files = [[examples.path, 1.0, self.round_idx]]
        for share, earlier in zip(recipe.mix_rounds, lineage(recipe, self.layout, self.round_idx)):
            if share > 0:
                pair_files.append([str((self.layout.selected if rest else self.layout.pairs)(earlier)), share, earlier])
        inputs = [examples, parent_task.output()]
        work_dir = prepare_work_dir(self.layout.train_work(self.round_idx), inputs)
        job = {
            "recipe": recipe.to_dict(), "parent": parent, "pair_files": pair_files, "work_dir": str(work_dir),
            "round_idx": self.round_idx, "root_model": root_model, "root_path": root_path,
            "run_dir": str(self.run_dir),  # experiment trackers (data/tracking.py) keep what they were sent there
            "parent_round": getattr(parent_task, "round_idx", 0),
        }
        # Under accelerate its processes use the GPUs held here (CUDA_VISIBLE_DEVICES is handed down to them).
        gpus = recipe.training.num_processes if recipe.training.launcher == "accelerate" else 1
        with self.output().temporary_path() as tmp, self.hold_gpus(gpus):
            job["out_dir"] = tmp
            if recipe.training.launcher == "accelerate":
                job_file = work_dir / "job.json"
                job_file.write_text(json.dumps(job, indent=2))
                command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(recipe.training.num_processes)]
                if recipe.training.accelerate_config:
                    command += ["--config_file", recipe.training.accelerate_config]
                elif recipe.training.num_processes > 1:
                    # Without a config accelerate starts one process; --multi_gpu starts N (DDP over NCCL on
                    # GPUs, over gloo on a machine without them).
                    command += ["--multi_gpu"]
                command += ["-m", "models.train.trainer", str(job_file)]
                # A SIGTERM/SIGINT is passed on to the training processes, which save a checkpoint and stop.
                if interrupt.run_forwarding_signals(command, cwd=Path(__file__).resolve().parents[1]) != 0:
                    if interrupt.received():
                        raise Interrupted(f"{interrupt.received()}: training of round {self.round_idx} stopped; "
                                          f"its trainer checkpoints are in {work_dir}; rerun the same command to resume")
                    raise TrainingError(f"round {self.round_idx}: `{' '.join(command)}` failed; its output is above")
            else:
                from models.train.trainer import run_job

                run_job(job)


def validation_set(task, recipe):
    """The validation prompts (data/validation.py) and the figure that selects (models/evaluate/selection.py)."""
    from data.validation import validation_prompts
    from models.evaluate.selection import selection_figure

    prompts = validation_prompts(recipe)
    if prompts is None:
        raise RecipeError(f"{task.short_name}: the recipe has no validation split (data.validation)")
    return prompts, selection_figure(recipe, prompts)


class Validate(GpuTask):
    round_idx = luigi.IntParameter(description="Round number; 0 scores the base model.")

    def requires(self):
        return {"model": model_task(self, self.round_idx), "base": model_task(self, 0)}

    def output(self):
        return FileTarget(str(self.layout.validation(self.round_idx)))

    def run(self):
        set_cpu_threads()
        from data.schema import VALIDATION, write_parquet
        from models.evaluate.selection import score_validation

        recipe = self.config.for_round(max(1, self.round_idx))
        prompts, figure = validation_set(self, recipe)
        with self.hold_gpus(1):
            frame = score_validation(recipe, self.round_idx, self.requires()["model"].model_path,
                                     self.requires()["base"].model_path, prompts, figure)
        write_parquet(frame, self.output().path, VALIDATION)


class Select(GpuTask):
    round_idx = luigi.IntParameter(description="Round number; 0 makes the base the first best.")

    @property
    def resources(self):  # the judge of win_rate_vs_best (select_by's default where no verifier can score) may hold a GPU
        judged = self.config.iterate.select_by in (None, "win_rate_vs_best")
        return {"gpu": 1} if judged and self.round_idx > 0 else {}

    def requires(self):
        deps = {"validation": self.clone(Validate)}
        if self.round_idx > 0:
            deps["previous"] = self.clone(Select, round_idx=self.round_idx - 1)
        return deps

    def output(self):
        return FileTarget(str(self.layout.selection(self.round_idx)))

    def run(self):
        from data.schema import VALIDATION, read_artifact
        from data.selection import (best_record, decide, paired_gain, publish_best, read_selection, record_parents,
                                    round_figures, summary)

        recipe = self.config.for_round(max(1, self.round_idx))
        prompts, figure = validation_set(self, recipe)
        current = read_artifact(self.layout.validation(self.round_idx), VALIDATION)
        previous = gain = None
        round_metrics = round_figures(current)
        if self.round_idx > 0:
            previous = read_selection(self.layout.selection(self.round_idx - 1))
            best = read_artifact(self.layout.validation(previous["best_round"]), VALIDATION)
            win_probs = None
            if figure == "win_rate_vs_best":
                win_probs = self.judge_against(recipe, prompts, current, best)
                round_metrics["win_rate_vs_best"] = summary(win_probs)
            gain = paired_gain(figure, current, best, win_probs)
        record = decide(self.round_idx, recipe.iterate, figure, previous, gain, round_metrics)
        kept = record["kept_round"]
        publish_best(self.layout, best_record(record, self.layout), self.kept_source(kept))
        record_parents(self.layout)
        with self.output().temporary_path() as tmp:
            atomic_write_json(tmp, record)

    def judge_against(self, recipe, prompts, current, best):
        from models.evaluate.selection import judge_vs_best

        ours = current.set_index("prompt_id").response.loc[prompts.prompt_id].tolist()
        theirs = best.set_index("prompt_id").response.loc[prompts.prompt_id].tolist()
        with self.hold_gpus(1):
            return judge_vs_best(recipe, model_task(self, 0).model_path, prompts, ours, theirs)

    def kept_source(self, kept: int) -> Path:
        """The directory best/ copies: the kept round's checkpoint, or the base model's files for round 0."""
        if kept > 0:
            return self.layout.checkpoint(kept)
        from models.evaluate.selection import model_directory

        base = model_task(self, 0)
        return model_directory(base.model_path, self.config.model.revision)
