"""Benchmark(1)'s way of running lm-eval against lm-eval's own, per answer option, on a finished run.

    python experiments/results/smollm2/lm_eval/compare_with_lm_eval.py RUN_DIR RECIPE

Scores data/fixtures/lm_eval/sums_mc.yaml three times with lm-eval 0.4.x and prints accuracy and seconds:
the base and round 1 as Benchmark loads them (models.load.loading.load_policy, unmerged, handed to HFLM), and
round 1 as lm-eval loads it itself (`pretrained=<run>/base_model,peft=<run>/round_01/checkpoint/adapter`);
then the largest difference between the two round-1 runs' log-likelihoods of the 4 x 60 options, and
how far round 1 moved them from the base. summary.json beside this file holds what it printed.
"""

import sys
import time
from pathlib import Path

import lm_eval
import numpy as np
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager

REPO = Path(__file__).resolve().parents[4]
sys.path.insert(0, str(REPO))

from configs.evaluation import BenchmarkSpec  # noqa: E402
from configs.recipe import load_recipe  # noqa: E402
from models.evaluate.benchmarks import task_file_config  # noqa: E402
from models.load.loading import load_policy, load_tokenizer  # noqa: E402


def option_logliks(output) -> np.ndarray:
    return np.array([[resp[0][0] for resp in sample["resps"]] for sample in output["samples"]["selfplay_sums_mc"]])


def main(run: str, recipe_path: str) -> None:
    recipe = load_recipe(recipe_path)
    config = task_file_config(BenchmarkSpec(task=str(REPO / "data" / "fixtures" / "lm_eval" / "sums_mc.yaml")))
    tasks = TaskManager(include_defaults=False)
    found = {}
    for name, path in (("base", f"{run}/base_model"), ("round1", f"{run}/round_01/checkpoint")):
        model = load_policy(path, recipe.model, root=f"{run}/base_model", merge=False)
        started = time.time()
        out = lm_eval.simple_evaluate(model=HFLM(pretrained=model, tokenizer=load_tokenizer(path, recipe.model), batch_size=8),
                                      tasks=[config], task_manager=tasks, log_samples=True)
        found[name] = option_logliks(out)
        print(name, out["results"]["selfplay_sums_mc"]["acc,none"], f"{time.time() - started:.0f}s")
    started = time.time()
    own = lm_eval.simple_evaluate(model="hf", model_args={"pretrained": f"{run}/base_model", "peft": f"{run}/round_01/checkpoint/adapter",
                                                          "dtype": "float32", "device": "cpu", "batch_size": 8},
                                  tasks=[config], task_manager=tasks, log_samples=True)
    print("lm-eval's own", own["results"]["selfplay_sums_mc"]["acc,none"], f"{time.time() - started:.0f}s")
    print("max |loglik round1 - lm-eval's own|", np.abs(found["round1"] - option_logliks(own)).max())
    moved = np.abs(found["round1"] - found["base"])
    print("round 1 vs base: mean |loglik change|", moved.mean(), "; chosen option changed on",
          int((found["round1"].argmax(1) != found["base"].argmax(1)).sum()), "of", len(moved))


if __name__ == "__main__":
    main(*sys.argv[1:3])
