"""DPO training throughput: our trainer against TRL's DPOTrainer, side by side in one process.

    python bench/bench_train.py --batch 8 --steps 30 --json out.json      # on a GPU (the H100 figures)
    python bench/bench_train.py --tiny --batch 2 --steps 4                 # CPU smoke run

Same model (a randomly initialised model of Qwen2.5-0.5B's config, bf16, sdpa), same data (random
word sequences, 128 prompt + 384 response tokens), same
LoRA (r 16, alpha 32, all linear layers), same batch size, DPO sigmoid loss, beta 0.1.

Prints for each: ms per optimizer step and tokens/s (chosen + rejected tokens through the policy,
steps after the first 10 for TRL and after the first for ours), peak GPU memory, model FLOPs
utilisation (6 N per token, N = parameters, against 989 TFLOP/s bf16 dense on an H100), and the
ratio ours / TRL. Ours is reported twice: training steps alone
(the reference log-probs are precomputed once per round) and end to end with that reference pass
counted, for one epoch. Finally both implementations compute the loss of the same batch with the
same (perturbed) adapter weights, and the two values are printed side by side.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PEAK_FLOPS = 989e12
PROMPT_LEN, RESPONSE_LEN = 128, 384


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


def make_model_config(tiny: bool):
    from transformers import Qwen2Config

    if tiny:
        return Qwen2Config(vocab_size=1003, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True)
    return Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                       num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True)


def make_pairs(n: int, vocab_words: int, prompt_len: int, response_len: int, seed: int = 0):
    import pandas as pd

    rng = random.Random(seed)
    words = lambda k: " ".join(f"w{rng.randrange(vocab_words)}" for _ in range(k))  # noqa: E731
    rows = [{"prompt_id": str(i), "prompt": words(prompt_len), "chosen": " " + words(response_len),
             "rejected": " " + words(response_len)} for i in range(n)]
    return pd.DataFrame(rows)


def run_trl(model_dir: str, tok, pairs, batch: int, steps: int, dtype) -> dict:
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
    args = DPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=batch, max_steps=steps, learning_rate=5e-6, beta=0.1,
                     bf16=dtype == torch.bfloat16, max_length=PROMPT_LEN + RESPONSE_LEN + 8, logging_steps=10, report_to="none",
                     save_strategy="no", gradient_checkpointing=False, dataloader_num_workers=0, use_cpu=not torch.cuda.is_available())
    lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    reset_peak()
    trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tok, peft_config=lora, callbacks=[Clock()])
    trainer.train()
    warm = min(10, steps // 2)
    seconds = times[steps] - times[warm]
    tokens = (steps - warm) * batch * 2 * (PROMPT_LEN + RESPONSE_LEN)
    out = {"ms_per_step": 1000 * seconds / (steps - warm), "tokens_per_s": tokens / seconds, "peak_gib": peak_gib()}
    out["trainer"] = trainer
    return out


def run_ours(model_dir: str, pairs, batch: int, steps: int, precision: str) -> dict:
    from configs.recipe import recipe_from_dict
    from data.layout import TRAINING_LOG
    from models.trainer import train_round

    recipe = recipe_from_dict({
        "name": "bench", "model": {"base_model": model_dir, "precision": precision},
        "training": {"loss": "dpo_sigmoid", "beta": 0.1, "learning_rate": 5e-6, "epochs": 1, "batch_size": batch,
                     "max_length": PROMPT_LEN + RESPONSE_LEN + 8, "lora_r": 16, "lora_alpha": 32, "save_steps": 10**9,
                     "save_merged": False, "warmup_ratio": 0.0},
    })
    work = Path(tempfile.mkdtemp())
    reset_peak()
    start = time.perf_counter()
    stats = train_round(recipe, model_dir, pairs.head(batch * steps), work / "work", work / "out", 1, model_dir)
    total = time.perf_counter() - start
    log = json.loads((work / "out" / TRAINING_LOG).read_text())["history"]
    timed = log[1:]
    seconds = sum(h["seconds"] for h in timed)
    tokens = sum(h["tokens"] for h in timed)
    train_tokens = sum(h["tokens"] for h in log)
    return {
        "ms_per_step": 1000 * seconds / len(timed), "tokens_per_s": tokens / seconds, "peak_gib": peak_gib(),
        "reference_seconds": stats["reference_seconds"],
        # One epoch end to end: every step plus the one-off reference pass (model loading and saving excluded).
        "end_to_end_tokens_per_s": train_tokens / (sum(h["seconds"] for h in log) + stats["reference_seconds"]),
        "wall_seconds_incl_load_save": total,
    }


def loss_agreement(trainer, batch_size: int) -> dict:
    """Both implementations' DPO loss on one batch, with the adapter moved away from its zero init."""
    from models.logps import sequence_logps
    from models.losses import PreferenceBatch, dpo_sigmoid

    model = trainer.model
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
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
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--tiny", action="store_true", help="a small model for a CPU smoke run")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM

    global PROMPT_LEN, RESPONSE_LEN
    if args.tiny:
        PROMPT_LEN, RESPONSE_LEN = 16, 48
    vocab_words = 1000 if args.tiny else 30000
    tok = make_tokenizer(vocab_words)
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    torch.manual_seed(0)
    model_dir = tempfile.mkdtemp(prefix="bench_model_")
    model = AutoModelForCausalLM.from_config(make_model_config(args.tiny), dtype=dtype)
    n_params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    del model
    pairs = make_pairs(args.batch * args.steps, vocab_words, PROMPT_LEN, RESPONSE_LEN)

    trl = run_trl(model_dir, tok, pairs, args.batch, args.steps, dtype)
    agreement = loss_agreement(trl.pop("trainer"), min(args.batch, 4))
    reset_peak()
    ours = run_ours(model_dir, pairs, args.batch, args.steps, "bf16" if dtype == torch.bfloat16 else "fp32")
    mfu = lambda tps: 6 * n_params * tps / PEAK_FLOPS * 100  # noqa: E731
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "parameters": n_params, "batch": args.batch, "steps": args.steps, "sequence": PROMPT_LEN + RESPONSE_LEN,
        "trl": {**trl, "mfu_percent": mfu(trl["tokens_per_s"])},
        "ours": {**ours, "mfu_percent": mfu(ours["tokens_per_s"])},
        "ratio_steps": ours["tokens_per_s"] / trl["tokens_per_s"],
        "ratio_end_to_end": ours["end_to_end_tokens_per_s"] / trl["tokens_per_s"],
        "loss_agreement": agreement,
    }
    print(json.dumps(result, indent=2))
    print(f"TRL DPOTrainer: {trl['ms_per_step']:.0f} ms/step, {trl['tokens_per_s']:.0f} tok/s | ours: {ours['ms_per_step']:.0f} ms/step, "
          f"{ours['tokens_per_s']:.0f} tok/s | ratio {result['ratio_steps']:.2f}x steps, {result['ratio_end_to_end']:.2f}x end to end "
          f"| loss TRL {agreement['trl_loss']:.5f} ours {agreement['our_loss']:.5f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
