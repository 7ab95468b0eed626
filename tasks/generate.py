"""Generate(r): sample responses to round r's prompts with the model after round r-1.

    luigi --module pipeline Generate --round-idx 1

Writes round_NN/generations.parquet (prompt_id, prompt, response, sample_index, round, num_tokens,
plus reference/task/answer/source_row/system) and round_NN/generate_meta.json. Parts of the work are kept in
round_NN/generate_work/ so a killed run resumes where it stopped (models/generation.py).
"""

import luigi

from pipeline.base import FileTarget, GpuTask, prepare_work_dir, set_cpu_threads
from tasks.chain import model_task


class Generate(GpuTask):
    round_idx = luigi.IntParameter(description="Round number, from 1.")

    def requires(self):
        return model_task(self, self.round_idx - 1)

    def output(self):
        return {
            "generations": FileTarget(str(self.round_dir(self.round_idx) / "generations.parquet")),
            "meta": FileTarget(str(self.round_dir(self.round_idx) / "generate_meta.json")),
        }

    def run(self):
        set_cpu_threads()
        from data.prompts import load_prompts, round_prompts
        from data.requirements import check_train_data
        from data.schema import GENERATIONS, atomic_write_json, write_parquet
        from models.generation import generate_round

        recipe = self.config.for_round(self.round_idx)
        prompts = load_prompts(
            recipe.data.train, recipe.data.train_split, recipe.data, require_reference=recipe.algorithm == "spin"
        )
        check_train_data(recipe, prompts, recipe.data.train)  # a hub dataset was not read before scheduling
        prompts = round_prompts(prompts, self.round_idx, recipe.data.prompts_per_round)
        work_dir = prepare_work_dir(self.round_dir(self.round_idx) / "generate_work", luigi.task.flatten(self.input()))
        frame, stats = generate_round(
            recipe, self.requires().model_path, prompts, self.round_idx, work_dir, root_path=model_task(self, 0).model_path
        )
        with self.output()["generations"].temporary_path() as tmp:
            write_parquet(frame, tmp, GENERATIONS)
        with self.output()["meta"].temporary_path() as tmp:
            atomic_write_json(tmp, stats)
