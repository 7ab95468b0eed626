"""Judge(r): turn round r's samples into preference pairs.

    luigi --module pipeline Judge --round-idx 1

SPIN pairs the ground truth (chosen) with the model's sample (rejected); SPPO and iterative DPO ask
the recipe's judge for every prompt's K x K win-probability matrix and keep best vs worst
(models/judges.py). Writes round_NN/pairs.parquet and round_NN/judge_meta.json (pairs made, ties and
identical pairs skipped, judge answers that could not be parsed).
"""

import luigi

from pipeline.base import FileTarget, GpuTask, set_cpu_threads
from tasks.chain import model_task


class Judge(GpuTask):
    round_idx = luigi.IntParameter(description="Round number, from 1.")

    def requires(self):
        from tasks.generate import Generate

        return {"generations": self.clone(Generate), "model": model_task(self, self.round_idx - 1)}

    def output(self):
        return {
            "pairs": FileTarget(str(self.round_dir(self.round_idx) / "pairs.parquet")),
            "meta": FileTarget(str(self.round_dir(self.round_idx) / "judge_meta.json")),
        }

    def run(self):
        set_cpu_threads()
        from data.schema import GENERATIONS, PAIRS, atomic_write_json, read_artifact, write_parquet
        from models.judges import make_judge, pair_round

        recipe = self.config.for_round(self.round_idx)
        generations = read_artifact(self.input()["generations"]["generations"].path, GENERATIONS)
        judge = None
        if recipe.algorithm != "spin":
            model = tokenizer = None
            if recipe.judge.name == "self":  # the round's generator judges its own samples
                from models.loading import load_policy, load_tokenizer

                model_path = self.requires()["model"].model_path
                tokenizer = load_tokenizer(model_path, recipe.model)
                model = load_policy(model_path, recipe.model, quantize=recipe.model.quantization == "4bit",
                                    root=model_task(self, 0).model_path)
            judge = make_judge(recipe.judge.name, recipe, model, tokenizer)
        pairs, stats = pair_round(recipe, generations, self.round_idx, judge)
        with self.output()["pairs"].temporary_path() as tmp:
            write_parquet(pairs, tmp, PAIRS)
        with self.output()["meta"].temporary_path() as tmp:
            atomic_write_json(tmp, stats)
