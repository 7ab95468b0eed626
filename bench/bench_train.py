"""DPO training throughput: our trainer against TRL's DPOTrainer, side by side in one process.

    python bench/bench_train.py --model cache:smollm2-135m-instruct --batch 4 --steps 4   # a real model, CPU or GPU
    python bench/bench_train.py --config qwen2.5-0.5b --batch 8 --steps 30                # random Qwen2.5-0.5B weights, GPU
    python bench/bench_train.py --config tiny --batch 2 --steps 4                         # smoke run

`--model` takes a directory, a .gguf file or `cache:<name>` (bench/common.py). Both trainers get the
same weights (fp32 on CPU, bf16 on a GPU), the same data (random word sequences of --prompt-len prompt
and --response-len response tokens through a word-level tokenizer whose ids lie in the model's
vocabulary, so both see identical token ids and lengths), the same LoRA (r 16, alpha 32, all linear
layers), the same batch, DPO sigmoid loss, beta 0.1, gradient checkpointing off.

Printed for each: ms per optimizer step and tokens/s (chosen + rejected tokens, each with its prompt,
after the first step, which allocates and warms up). Ours runs a pair's prompt once for both sides
where the model allows (models/logps.py, shares_prompt): its tokens/s counts the pair tokens as TRL's
does, its MFU only the tokens it ran. TRL computes the reference log-probs inside
every step (the adapter disabled); ours precomputes them once per round, so ours is reported end to
end (every step plus that reference pass) as well as steps alone, and the ratio that counts is end
to end against TRL. Model FLOPs per token: 6 N (N = parameters): the policy's forward 2 N and
backward 2 N (input gradients only: the base weights are frozen) and the reference forward 2 N;
attention's own FLOPs are left out. MFU is that rate over the peak: on a GPU its datasheet bf16
dense peak, on a CPU the fp32 matmul rate measured in this run on the model's layer shapes
(bench/common.py). Finally both implementations compute the loss of the same batch with the same
(perturbed) adapter, printed side by side. `--profile` prints where one of our training steps spends
its time.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import gpu_peak_flops, layer_shapes, machine, matmul_probe, model_directory, move_lora_off_zero  # noqa: E402



def make_tokenizer(vocab_words: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"w{i}": i + 3 for i in range(vocab_words)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    # A template that adds nothing but the eos after a response, so both trainers see identical tokens.
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% if m['role'] == 'assistant' %}{{ ' <eos>' }}{% endif %}{% endfor %}"
    return tok


def make_model_config(name: str):
    from transformers import Qwen2Config

    if name == "tiny":
        return Qwen2Config(vocab_size=1003, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True)
    return Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                       num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True)


def bench_model_dir(args, dtype) -> tuple[str, object, int]:
    """A directory with the model's weights and the bench tokenizer; the tokenizer; the vocabulary words used."""
    from transformers import AutoConfig, AutoModelForCausalLM

    out = Path(tempfile.mkdtemp(prefix="bench_model_"))
    if args.model:
        source = Path(model_directory(args.model))
        for path in source.iterdir():  # the weights and config; the tokenizer is the bench's own
            if path.suffix in (".safetensors", ".json") and not path.name.startswith("tokenizer") and path.name != "base_model.json":
                (out / path.name).symlink_to(path.resolve())
        vocab_size = AutoConfig.from_pretrained(out).vocab_size
    else:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(make_model_config(args.config), dtype=dtype)
        model.save_pretrained(out)
        vocab_size = model.config.vocab_size
        del model
    vocab_words = min(30000, vocab_size - 3)
    tok = make_tokenizer(vocab_words)
    tok.save_pretrained(out)
    return str(out), tok, vocab_words


def make_pairs(n: int, vocab_words: int, prompt_len: int, response_len: int, seed: int = 0):
    import pandas as pd

    rng = random.Random(seed)
    words = lambda k: " ".join(f"w{rng.randrange(vocab_words)}" for _ in range(k))  # noqa: E731
    rows = [{"prompt_id": str(i), "prompt": words(prompt_len), "chosen": " " + words(response_len),
             "rejected": " " + words(response_len)} for i in range(n)]
    return pd.DataFrame(rows)


def run_trl(model_dir: str, tok, pairs, args, dtype) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    times = {}

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times[state.global_step] = time.perf_counter()

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa")
    data = Dataset.from_pandas(pairs[["prompt", "chosen", "rejected"]])
    config = DPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.batch, max_steps=args.steps, learning_rate=5e-6,
                       beta=0.1, bf16=dtype == torch.bfloat16, max_length=args.prompt_len + args.response_len + 8, logging_steps=10,
                       report_to="none", save_strategy="no", gradient_checkpointing=False, dataloader_num_workers=0,
                       use_cpu=not torch.cuda.is_available())
    lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    reset_peak()
    trainer = DPOTrainer(model=model, args=config, train_dataset=data, processing_class=tok, peft_config=lora, callbacks=[Clock()])
    trainer.train()
    # Every pair has the same length (one word, one token): prompt + response + the eos TRL appends, twice.
    rows = trainer.train_dataset[:1]
    tokens_per_step = args.batch * (2 * len(rows["prompt_ids"][0]) + len(rows["chosen_ids"][0]) + len(rows["rejected_ids"][0]))
    warm = min(10, args.steps // 2)
    seconds = times[args.steps] - times[warm]
    out = {"ms_per_step": 1000 * seconds / (args.steps - warm), "tokens_per_s": (args.steps - warm) * tokens_per_step / seconds,
           "timed_steps": args.steps - warm, "peak_gib": peak_gib()}
    out["trainer"] = trainer
    return out


def run_ours(model_dir: str, pairs, args, precision: str, shared_prompt: bool = True) -> dict:
    from configs.recipe import recipe_from_dict
    from data.layout import TRAINING_LOG
    from models.train.trainer import train_round

    recipe = recipe_from_dict({
        "name": "bench", "model": {"base_model": model_dir, "precision": precision},
        "training": {"loss": "dpo_sigmoid", "beta": 0.1, "learning_rate": 5e-6, "epochs": 1, "batch_size": args.batch,
                     "max_length": args.prompt_len + args.response_len + 8, "lora_r": 16, "lora_alpha": 32, "save_steps": 10**9,
                     "save_merged": False, "warmup_ratio": 0.0, "lora_target_modules": "all-linear", "shared_prompt": shared_prompt},
    })
    work = Path(tempfile.mkdtemp())
    reset_peak()
    start = time.perf_counter()
    stats = train_round(recipe, model_dir, pairs.head(args.batch * args.steps), work / "work", work / "out", 1, model_dir)
    total = time.perf_counter() - start
    log = json.loads((work / "out" / TRAINING_LOG).read_text())["history"]
    shutil.rmtree(work, ignore_errors=True)
    timed = log[1:]
    seconds = sum(h["seconds"] for h in timed)
    tokens = sum(h["tokens"] for h in timed)
    tokens_run = sum(h["tokens_run"] for h in timed)  # fewer where each prompt runs once for both sides
    # The reference pass once per round, charged to the timed steps by their share of the tokens.
    reference = stats["reference_seconds"] * tokens / sum(h["tokens"] for h in log)
    return {
        "ms_per_step": 1000 * seconds / len(timed), "timed_steps": len(timed), "steps_tokens_per_s": tokens / seconds,
        "reference_seconds": stats["reference_seconds"], "tokens_per_s": tokens / (seconds + reference),
        "shared_prompt": stats["shared_prompt"], "tokens_run_per_s": tokens_run / (seconds + reference),
        "peak_gib": peak_gib(), "wall_seconds_incl_load_save": total,
    }


def profile_step(model_dir: str, pairs, args, precision: str, rows: int = 20) -> str:
    """Where one of our training micro-batches (forward and backward) spends its time, by operator."""
    from torch.profiler import ProfilerActivity, profile

    from configs.recipe import recipe_from_dict
    from data.prompts import format_completion, format_prompt
    from models.load.loading import add_lora, load_causal_lm, load_tokenizer
    from models.logps import collate, encode_pair, sequence_logps

    recipe = recipe_from_dict({"name": "bench", "model": {"base_model": model_dir, "precision": precision},
                               "training": {"lora_r": 16, "lora_alpha": 32, "lora_target_modules": "all-linear"}})
    tok = load_tokenizer(model_dir, recipe.model)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = add_lora(load_causal_lm(model_dir, recipe.model, device=device), recipe.training)
    items = []
    for row in pairs.head(args.batch).itertuples():
        prompt = format_prompt(tok, row.prompt)
        items += encode_pair(tok, prompt, format_completion(tok, row.prompt, row.chosen), format_completion(tok, row.prompt, row.rejected),
                             10**6)
    batch = {k: v.to(device) for k, v in collate(items, tok.pad_token_id).items()}
    model.train()
    sequence_logps(model, batch)[0].sum().backward()  # warm-up
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        sequence_logps(model, batch)[0].sum().backward()
    return prof.key_averages().table(sort_by="self_cuda_time_total" if device == "cuda" else "self_cpu_time_total", row_limit=rows)


def loss_agreement(trainer, batch_size: int) -> dict:
    """Both implementations' DPO loss on one batch, with the adapter moved away from its zero init."""
    from models.logps import sequence_logps
    from models.train.losses import PreferenceBatch, dpo_sigmoid

    model = trainer.model
    move_lora_off_zero(model)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(batch_size)])
    batch = {k: v.to(trainer.accelerator.device) if torch.is_tensor(v) else v for k, v in batch.items()}
    model.eval()
    with torch.no_grad(), trainer.accelerator.autocast():
        trl_loss = trainer.compute_loss(model, batch).item()
        ours_in = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                   "completion_mask": batch["completion_mask"].bool()}
        policy, _ = sequence_logps(model, ours_in)
        with model.disable_adapter():
            ref, _ = sequence_logps(model, ours_in)
    n = policy.shape[0] // 2
    ours_loss = dpo_sigmoid(PreferenceBatch(policy[:n], policy[n:], ref[:n], ref[n:], 0.1)).mean().item()
    return {"trl_loss": trl_loss, "our_loss": ours_loss, "abs_diff": abs(trl_loss - ours_loss)}


def reset_peak():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--model", help="a model directory, a .gguf file or cache:<name> (python -m models.fetch)")
    what.add_argument("--config", choices=["qwen2.5-0.5b", "tiny"], help="random weights of this shape instead (default qwen2.5-0.5b)")
    parser.add_argument("--batch", type=int, default=8, help="pairs per step")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--response-len", type=int, default=384)
    parser.add_argument("--profile", action="store_true", help="also print where one of our training steps spends its time")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not args.model and not args.config:
        args.config = "qwen2.5-0.5b"
    if args.config == "tiny":
        args.prompt_len, args.response_len = min(args.prompt_len, 16), min(args.response_len, 48)

    from transformers import AutoConfig

    on_gpu = torch.cuda.is_available()
    dtype = torch.bfloat16 if on_gpu else torch.float32
    model_dir, tok, vocab_words = bench_model_dir(args, dtype)
    config = AutoConfig.from_pretrained(model_dir)
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        n_params = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    pairs = make_pairs(args.batch * args.steps, vocab_words, args.prompt_len, args.response_len)
    where = machine()
    device_name = where["gpu"] or "cpu"
    if on_gpu:
        peak = gpu_peak_flops(device_name)
        probe = None
    else:  # the CPU's ceiling, measured now on the layer shapes of one micro-batch
        probe = matmul_probe(layer_shapes(config, 2 * args.batch * (args.prompt_len + args.response_len)))
        peak = probe["best_gflops_per_s"] * 1e9
    print(json.dumps({"machine": where, "parameters": n_params, "matmul_probe": probe}), flush=True)

    trl = run_trl(model_dir, tok, pairs, args, dtype)
    agreement = loss_agreement(trl.pop("trainer"), min(args.batch, 4))
    reset_peak()
    precision = "bf16" if on_gpu else "fp32"
    ours = run_ours(model_dir, pairs, args, precision)
    reset_peak()
    ours_unshared = run_ours(model_dir, pairs, args, precision, shared_prompt=False)  # what sharing the prompt gives
    mfu = lambda tps: round(6 * n_params * tps / peak * 100, 1) if peak else None  # noqa: E731
    result = {
        "model": args.model or f"{args.config} (random weights)", "machine": where, "device": device_name, "parameters": n_params,
        "batch": args.batch, "steps": args.steps, "prompt_len": args.prompt_len, "response_len": args.response_len,
        "peak_flops": peak, "matmul_probe": probe,
        "trl": {**trl, "mfu_percent": mfu(trl["tokens_per_s"])},
        # MFU counts the FLOPs run: a prompt shared by both sides of a pair is run, and counted, once.
        "ours": {**ours, "mfu_percent": mfu(ours["tokens_run_per_s"])},
        "ours_without_shared_prompt": {**ours_unshared, "mfu_percent": mfu(ours_unshared["tokens_run_per_s"])},
        "ratio": ours["tokens_per_s"] / trl["tokens_per_s"],
        "ratio_steps_alone": ours["steps_tokens_per_s"] / trl["tokens_per_s"],
        "loss_agreement": agreement,
    }
    if args.profile:
        result["profile"] = profile_step(model_dir, pairs, args, precision)
        print(result["profile"])
    print(json.dumps({k: v for k, v in result.items() if k != "profile"}, indent=2))
    print(f"TRL DPOTrainer: {trl['ms_per_step']:.0f} ms/step, {trl['tokens_per_s']:.1f} tok/s, MFU {result['trl']['mfu_percent']}% | "
          f"ours: {ours['ms_per_step']:.0f} ms/step, {ours['tokens_per_s']:.1f} tok/s with the reference pass "
          f"({ours['steps_tokens_per_s']:.1f} steps alone), MFU {result['ours']['mfu_percent']}% | ratio {result['ratio']:.2f}x "
          f"| ours with two full sequences per pair: {ours_unshared['tokens_per_s']:.1f} tok/s, MFU {result['ours_without_shared_prompt']['mfu_percent']}% "
          f"| loss TRL {agreement['trl_loss']:.5f} ours {agreement['our_loss']:.5f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
