"""RunSetup writes run.yaml; BaseModel provides the round-0 model.

    luigi --module pipeline BaseModel            # builds the demo model alone

run.yaml records what made the run: the resolved recipe, package versions, the git commit and seed.
BaseModel provides the demo model when the recipe names no `model.base_model`: a copy of the shipped
data/demo/base_model/ when the recipe's demo_model, data.train and seed are the ones it was built with,
else it builds one (models/train/sft.py); for a
named model it checks the path or hub id loads as a config and records it, so every round downstream
reads one `model_path`. A GGUF file (`model.base_model: path/to/model.gguf` or
`cache:smollm2-135m-instruct`) is de-quantised once into base_model/ (models/load/gguf.py), and that
directory is the model every later stage loads.
"""

import json
import logging
import shlex
import shutil
import sys
import time
from pathlib import Path

import yaml

from configs.recipe import DEMO_BASE
from data.layout import BASE_MODEL_INFO
from tasks.base import DirTarget, FileTarget, GpuTask, RunTask, git_commit, package_versions, set_cpu_threads

DEMO_ROOT = "selfplay-demo"  # root_model of checkpoints descending from the built demo model
log = logging.getLogger("selfplay")


class RunSetup(RunTask):
    def output(self):
        return FileTarget(str(self.layout.run_yaml))

    def run(self):
        record = {
            "recipe": self.config.to_dict(),
            "recipe_path": str(self.recipe),
            "seed": self.config.seed,
            "git_commit": git_commit(),
            "versions": package_versions(),
            "command": " ".join(shlex.quote(a) for a in sys.argv),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        with self.output().temporary_path() as tmp:
            Path(tmp).write_text(yaml.safe_dump(record, sort_keys=False))


class BaseModel(GpuTask):
    def requires(self):
        return self.clone(RunSetup)

    def output(self):
        return DirTarget(str(self.layout.base_model))

    @property
    def model_path(self) -> str:
        from models.load.gguf import is_gguf_spec

        base = self.config.model.base_model
        return self.output().path if base in (None, DEMO_BASE) or is_gguf_spec(base) else base

    @property
    def root_model(self) -> str:
        return self.config.model.base_model or DEMO_ROOT

    def run(self):
        set_cpu_threads()
        recipe = self.config
        with self.output().temporary_path() as tmp:
            from models.load.gguf import is_gguf_spec

            if recipe.model.base_model in (None, DEMO_BASE):
                from models.train.sft import build_demo_base, demo_base_dir, shipped_base_differences, shipped_demo_base

                # `demo` names the shipped base whatever the recipe's demo_model says; null takes it only when it
                # was built with exactly these settings, and otherwise says why it builds another.
                shipped = demo_base_dir() if recipe.model.base_model == DEMO_BASE else shipped_demo_base(recipe)
                if shipped is not None:
                    shutil.copytree(shipped, tmp, dirs_exist_ok=True)
                    info = {"copied_from": str(shipped), **json.loads((Path(tmp) / "demo_build.json").read_text())}
                else:
                    log.info("model.base_model is null and %s differ from the shipped demo base's: building a demo model "
                             "on %s (%d supervised steps); model.base_model: demo uses the shipped one instead",
                             ", ".join(shipped_base_differences(recipe)), recipe.data.train, recipe.demo_model.sft_steps)
                    info = build_demo_base(recipe, Path(tmp))
            elif is_gguf_spec(recipe.model.base_model):
                from models.load.gguf import convert_gguf, resolve_gguf

                info = convert_gguf(resolve_gguf(recipe.model.base_model), tmp, recipe.model.trust_remote_code)
            else:
                from transformers import AutoConfig

                from models.load.loading import check_model_path, load_tokenizer

                check_model_path(recipe.model.base_model)
                config = AutoConfig.from_pretrained(recipe.model.base_model, trust_remote_code=recipe.model.trust_remote_code)
                load_tokenizer(recipe.model.base_model, recipe.model)
                info = {"model_type": config.model_type}
            info["root_model"] = self.root_model
            (Path(tmp) / BASE_MODEL_INFO).write_text(json.dumps(info, indent=2) + "\n")
