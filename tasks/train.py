"""Train(r): continue the policy's LoRA adapter on round r's preference pairs, with round r-1 as the reference.

    luigi --module pipeline Train --round-idx 1

Loads the root weights plus round r-1's adapter (the policy after round r-1; a fresh adapter in round
1), trains with the recipe's DPO-family loss (models/trainer.py) on round r's pairs (plus round r-1's
when `training.mix_previous_round`, SPIN's default), and writes round_NN/checkpoint/: adapter/ (the
policy), the merged export, tokenizer, training_log.json and, last, _SUCCESS.
Trainer checkpoints live in round_NN/train_work/; a killed run resumes from the newest one.

With `training.launcher: accelerate` the task starts `accelerate launch --num_processes N` on the
same code (DDP; see the README for FSDP) and waits for it.
"""

import json
import sys
from pathlib import Path

import luigi

from common import interrupt
from common.errors import Interrupted, TrainingError
from pipeline.base import DirTarget, GpuTask, prepare_work_dir, set_cpu_threads
from tasks.chain import model_task


class Train(GpuTask):
    round_idx = luigi.IntParameter(description="Round number, from 1.")

    def requires(self):
        from tasks.judge import Judge

        deps = {"pairs": self.clone(Judge), "parent": model_task(self, self.round_idx - 1), "base": model_task(self, 0)}
        if self.round_idx > 1 and self.config.for_round(self.round_idx).mix_previous_round:
            deps["previous_pairs"] = self.clone(Judge, round_idx=self.round_idx - 1)
        return deps

    def output(self):
        return DirTarget(str(self.round_dir(self.round_idx) / "checkpoint"))

    @property
    def model_path(self) -> str:
        return self.output().path

    def run(self):
        set_cpu_threads()
        from models.loading import check_same_root

        recipe = self.config.for_round(self.round_idx)
        parent = self.requires()["parent"].model_path
        root_model = self.requires()["base"].root_model
        root_path = self.requires()["base"].model_path
        check_same_root(parent, root_model)
        pair_files = [self.input()["pairs"]["pairs"].path]
        if "previous_pairs" in self.input():
            pair_files.append(self.input()["previous_pairs"]["pairs"].path)
        inputs = [self.input()["pairs"]["pairs"], self.input()["parent"]]
        work_dir = prepare_work_dir(self.round_dir(self.round_idx) / "train_work", inputs)
        job = {
            "recipe": recipe.to_dict(), "parent": parent, "pair_files": pair_files, "work_dir": str(work_dir),
            "round_idx": self.round_idx, "root_model": root_model, "root_path": root_path,
        }
        with self.output().temporary_path() as tmp:
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
                command += ["-m", "models.trainer", str(job_file)]
                # A SIGTERM/SIGINT is passed on to the training processes, which save a checkpoint and stop.
                if interrupt.run_forwarding_signals(command, cwd=Path(__file__).resolve().parents[1]) != 0:
                    if interrupt.received():
                        raise Interrupted(f"{interrupt.received()}: training of round {self.round_idx} stopped; "
                                          f"its trainer checkpoints are in {work_dir}; rerun the same command to resume")
                    raise TrainingError(f"round {self.round_idx}: `{' '.join(command)}` failed; its output is above")
            else:
                from models.trainer import run_job

                run_job(job)
