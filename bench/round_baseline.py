"""One self-play round the way the official SPIN and SPPO repositories run it: each step its own process.

    python bench/round_baseline.py generate --model DIR --prompts train.jsonl --out samples.jsonl --samples 8 ...
    python bench/round_baseline.py judge --algorithm dpo --samples-file samples.jsonl --prompts train.jsonl --out pairs.jsonl ...
    python bench/round_baseline.py train --model DIR --pairs pairs.jsonl --out adapter/ ...
    python bench/round_baseline.py evaluate --model DIR [--adapter adapter/ --base-eval base.json] --prompts heldout.jsonl --out metrics.json ...

The baseline arm of bench/bench_round.py, written plainly with the libraries people use for it and none of
ours: Hugging Face `generate` for the samples (`num_return_sequences` = K, a seed set once per process),
a ranking step, TRL's `DPOTrainer` with LoRA and `precompute_ref_log_probs=True`, and an evaluation of the
held-out prompts that computes our Evaluate's figures that cost model time (cmd_evaluate). The one piece of
ours is the verifier (models/judge/verifiers.py): the judge is not what the bench compares, and both arms must
score answers alike. SPIN pairs the ground truth
(chosen) with the model's sample (rejected), as its official code does; iterative DPO keeps, per prompt,
the first sample the verifier scores highest against the first it scores lowest, and skips a prompt whose
samples all score the same (SPPO's ranking script keeps best against worst the same way).

Each process reads SELFPLAY_CPU_THREADS for torch's threads, as our tasks do, so both arms use the same.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def write_jsonl(rows: list[dict], path) -> None:
    tmp = Path(f"{path}.tmp")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))
    tmp.replace(path)


def write_json(record: dict, path) -> None:
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(path)


def set_threads() -> None:
    import torch

    if os.environ.get("SELFPLAY_CPU_THREADS"):
        torch.set_num_threads(int(os.environ["SELFPLAY_CPU_THREADS"]))


def messages(row: dict) -> list[dict]:
    system = [{"role": "system", "content": row["system"]}] if row.get("system") else []
    return system + [{"role": "user", "content": row["prompt"]}]


def prompt_texts(tokenizer, rows: list[dict]) -> list[str]:
    return [tokenizer.apply_chat_template(messages(row), tokenize=False, add_generation_prompt=True) for row in rows]


def load_model(model_dir: str, adapter: str | None):
    """The base in fp32, and a trained round's LoRA adapter merged in (as one loads a checkpoint to sample from)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return tokenizer, model.eval()


def sample(model, tokenizer, texts: list[str], samples: int, batch_size: int, new_tokens: int, temperature: float,
           top_p: float) -> list[list[tuple[str, int, bool]]]:
    """`samples` responses to each text by `generate` ((text, tokens, ended at eos) each); greedy at temperature 0."""
    import torch

    per_batch = max(1, batch_size // samples)
    # top_k 0: no top-k cut (generate's default is 50), so both arms sample from the same nucleus.
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0} if temperature > 0 else \
        {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    out = []
    for start in range(0, len(texts), per_batch):
        batch = tokenizer(texts[start:start + per_batch], return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            tokens = model.generate(**batch, max_new_tokens=new_tokens, num_return_sequences=samples,
                                    pad_token_id=tokenizer.pad_token_id, **sampling)
        new = tokens[:, batch.input_ids.shape[1]:].tolist()
        decoded = []
        for row in new:
            ended = tokenizer.eos_token_id in row
            row = row[:row.index(tokenizer.eos_token_id)] if ended else row
            decoded.append((tokenizer.decode(row, skip_special_tokens=True).strip(), len(row) + ended, ended))
        out += [decoded[i:i + samples] for i in range(0, len(decoded), samples)]
    return out


def cmd_generate(args) -> None:
    import torch

    set_threads()
    tokenizer, model = load_model(args.model, args.adapter)
    rows = read_jsonl(args.prompts)
    torch.manual_seed(args.seed)
    responses = sample(model, tokenizer, prompt_texts(tokenizer, rows), args.samples, args.batch_size, args.max_new_tokens,
                       args.temperature, args.top_p)
    write_jsonl([{"prompt_id": row["prompt_id"], "sample_index": k, "response": text, "num_tokens": n, "finished": ended}
                 for row, row_samples in zip(rows, responses) for k, (text, n, ended) in enumerate(row_samples)], args.out)


def verifier_score(verifier, row: dict, response: str) -> float:
    return verifier.score(row["prompt"], response, row.get("row") or {}, row.get("answer"))


def cmd_judge(args) -> None:
    sys.path.insert(0, str(REPO))
    from models.judge.verifiers import load_verifier

    rows = {row["prompt_id"]: row for row in read_jsonl(args.prompts)}
    by_prompt: dict[str, list[dict]] = {}
    for s in read_jsonl(args.samples_file):
        by_prompt.setdefault(s["prompt_id"], []).append(s)
    verifier = load_verifier(args.verifier)
    pairs = []
    for prompt_id, samples in by_prompt.items():
        row = rows[prompt_id]
        if args.algorithm == "spin":  # the ground truth against the model's own sample
            chosen, rejected = row["reference"], samples[0]["response"]
        else:
            scores = [verifier_score(verifier, row, s["response"]) for s in samples]
            if max(scores) == min(scores):
                continue
            chosen, rejected = samples[scores.index(max(scores))]["response"], samples[scores.index(min(scores))]["response"]
        pairs.append({"prompt_id": prompt_id, "prompt": row["prompt"], "system": row.get("system"), "chosen": chosen,
                      "rejected": rejected})
    write_jsonl(pairs, args.out)


def dpo_trainer(model_dir: str, pairs: list[dict], args, output_dir: str):
    """TRL's DPOTrainer on `pairs` (prompt in the chat template; chosen and rejected as text, TRL adds the eos)."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    texts = prompt_texts(tokenizer, pairs)
    data = Dataset.from_list([{"prompt": text, "chosen": p["chosen"], "rejected": p["rejected"]} for text, p in zip(texts, pairs)])
    # Our trainer warms up for int(ratio x steps) steps; a fractional `warmup_steps` makes transformers round the
    # ratio up (1 step of 2 at 0.1, at learning rate 0), which trains another adapter from the same pairs. With no
    # warm-up step both schedules are the same linear decay; with some, transformers' ramp starts at 0, ours at
    # 1 / (steps + 1).
    total_steps = math.ceil(args.epochs * math.ceil(len(pairs) / args.batch_size))
    config = DPOConfig(
        output_dir=output_dir, per_device_train_batch_size=args.batch_size, num_train_epochs=args.epochs,
        learning_rate=args.learning_rate, beta=args.beta, loss_type=["sigmoid"], max_length=args.max_length,
        precompute_ref_log_probs=True, warmup_steps=int(args.warmup_ratio * total_steps), lr_scheduler_type="linear", max_grad_norm=1.0,
        weight_decay=0.0, seed=args.seed, logging_steps=1, save_strategy="no", report_to="none", bf16=False,
        gradient_checkpointing=False, dataloader_num_workers=0, use_cpu=not torch.cuda.is_available(),
    )
    lora = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0, target_modules=args.lora_target_modules.split(","),
                      task_type="CAUSAL_LM")
    return DPOTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer, peft_config=lora)


def cmd_train(args) -> None:
    set_threads()
    pairs = read_jsonl(args.pairs)
    trainer = dpo_trainer(args.model, pairs, args, str(Path(args.out).parent / "trl_work"))
    start = time.perf_counter()
    trainer.train()
    trainer.save_model(args.out)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    write_json({"pairs": len(pairs), "steps": trainer.state.global_step, "losses": losses,
                "train_seconds": time.perf_counter() - start}, Path(args.out) / "train_log.json")


def completion_logps(model, tokenizer, rows: list[dict], completions: list[str], batch_size: int) -> tuple[list[float], list[int]]:
    """Summed log-probs of each completion after its chat-formatted prompt, and its token count, the way one
    writes it with plain `transformers`: the prompt and the assistant turn up to its end-of-turn token (a
    template's newline after it is not the model's to write) tokenized, right-padded batches, one forward
    each, log-softmax gathered at the completion's tokens."""
    import torch

    sequences = []
    for row, completion in zip(rows, completions):
        prompt = tokenizer.apply_chat_template(messages(row), tokenize=False, add_generation_prompt=True)
        whole = tokenizer.apply_chat_template(messages(row) + [{"role": "assistant", "content": completion}], tokenize=False)
        prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
        sequences.append((prompt_ids, tokenizer(whole[len(prompt):].rstrip(), add_special_tokens=False).input_ids))
    sums = []
    for start in range(0, len(sequences), batch_size):
        batch = sequences[start:start + batch_size]
        width = max(len(p) + len(c) for p, c in batch)
        ids = torch.full((len(batch), width), tokenizer.pad_token_id)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for i, (p, c) in enumerate(batch):
            ids[i, :len(p) + len(c)] = torch.tensor(p + c)
            mask[i, :len(p) + len(c)] = 1
        with torch.no_grad():
            logps = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float().log_softmax(-1)
        token_logps = logps.gather(-1, ids[:, 1:, None])[..., 0]
        sums += [float(token_logps[i, len(p) - 1:len(p) + len(c) - 1].sum()) for i, (p, c) in enumerate(batch)]
    return sums, [len(c) for _, c in sequences]


def distinct(texts: list[str], n: int) -> float:
    grams = [tuple(words[i:i + n]) for words in (t.split() for t in texts) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def cmd_evaluate(args) -> None:
    """The held-out figures our Evaluate reports that cost model time: greedy accuracy and length; one sample a
    prompt at temperature 1 (distinct-n, and KL to the base from round 1, the sample scored under both); the
    ground truth's log-likelihood; the held-out pairs fixed by the base's evaluation (ground truth against the
    base's sample), whose implicit reward the next round reports. Win rates (verifier comparisons of the greedy
    answers, no model work) are left out."""
    import torch

    sys.path.insert(0, str(REPO))
    from models.judge.verifiers import load_verifier

    set_threads()
    tokenizer, model = load_model(args.model, args.adapter)
    rows = read_jsonl(args.prompts)
    texts = prompt_texts(tokenizer, rows)
    answers = sample(model, tokenizer, texts, 1, args.batch_size, args.max_new_tokens, 0.0, 1.0)
    torch.manual_seed(args.seed)
    samples = [s[0][0] for s in sample(model, tokenizer, texts, 1, args.batch_size, args.max_new_tokens, 1.0, 1.0)]
    verifier = load_verifier(args.verifier)
    scores = [verifier_score(verifier, row, a[0][0]) for row, a in zip(rows, answers)]
    lengths = [a[0][1] for a in answers]
    base_eval = json.loads(Path(args.base_eval).read_text()) if args.base_eval else None
    chosen = [row["reference"].strip() for row in rows]
    rejected = base_eval["pair_rejected"] if base_eval else samples  # the pairs are fixed by the base's evaluation
    # The samples' log-probs under the policy are for KL, which is 0 at the base by definition.
    to_score = chosen + rejected + (samples if base_eval else [])
    scored, tokens = completion_logps(model, tokenizer, rows * (len(to_score) // len(rows)), to_score, args.logp_batch_size)
    n = len(rows)
    record = {"prompts": n, "accuracy": sum(scores) / n, "mean_length": sum(lengths) / n, "responses": [a[0][0] for a in answers],
              "distinct_1": distinct(samples, 1), "distinct_2": distinct(samples, 2), "gt_logprob": sum(s / t for s, t in zip(scored[:n], tokens)) / n,
              "pair_rejected": rejected, "pair_logps": [scored[:n], scored[n:2 * n]]}
    if base_eval:
        del model
        _, base = load_model(args.model, None)
        base_logps, _ = completion_logps(base, tokenizer, rows, samples, args.logp_batch_size)
        record["kl_vs_base"] = sum(p - b for p, b in zip(scored[2 * n:], base_logps)) / n
        (chosen_now, rejected_now), (chosen_base, rejected_base) = record["pair_logps"], base_eval["pair_logps"]
        margins = [args.beta * ((c - cb) - (r - rb)) for c, cb, r, rb in zip(chosen_now, chosen_base, rejected_now, rejected_base)]
        record["implicit_reward_margin"] = sum(margins) / n
        record["implicit_reward_accuracy"] = sum(m > 0 for m in margins) / n
    write_json(record, args.out)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    steps = parser.add_subparsers(dest="step", required=True)
    for name in ("generate", "evaluate"):
        step = steps.add_parser(name)
        step.add_argument("--model", required=True)
        step.add_argument("--adapter")
        step.add_argument("--prompts", required=True)
        step.add_argument("--out", required=True)
        step.add_argument("--batch-size", type=int, default=64, help="rows per generate call")
        step.add_argument("--max-new-tokens", type=int, default=32)
        step.add_argument("--seed", type=int, default=0)
        if name == "generate":
            step.add_argument("--samples", type=int, default=1)
            step.add_argument("--temperature", type=float, default=0.7)
            step.add_argument("--top-p", type=float, default=0.9)
        else:
            step.add_argument("--verifier", required=True)
            step.add_argument("--base-eval", help="the base's evaluation (its held-out pairs); from round 1 on")
            step.add_argument("--beta", type=float, default=0.1)
            step.add_argument("--logp-batch-size", type=int, default=16)
    judge = steps.add_parser("judge")
    judge.add_argument("--algorithm", choices=["spin", "dpo"], required=True)
    judge.add_argument("--samples-file", required=True)
    judge.add_argument("--prompts", required=True)
    judge.add_argument("--verifier", required=True)
    judge.add_argument("--out", required=True)
    train = steps.add_parser("train")
    train.add_argument("--model", required=True)
    train.add_argument("--pairs", required=True)
    train.add_argument("--out", required=True)
    add_training_options(train)
    args = parser.parse_args(argv)
    {"generate": cmd_generate, "judge": cmd_judge, "train": cmd_train, "evaluate": cmd_evaluate}[args.step](args)


def add_training_options(parser) -> None:
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--max-length", type=int, default=192)
    parser.add_argument("--warmup-ratio", type=float, default=0.1)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--lora-alpha", type=int, default=32)
    parser.add_argument("--lora-target-modules", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    parser.add_argument("--seed", type=int, default=0)


if __name__ == "__main__":
    main()
