"""What a large vocabulary costs in training memory: Gemma 3 270M's shape at its 262,144 tokens and at smaller ones.

    python bench/vocab_memory.py --json bench/results/gemma3_vocab_memory_cpu.json
    python bench/vocab_memory.py --vocab 262144,49152 --pairs 8 --prompt-len 64 --response-len 32

Each arm is the Gemma 3 270M architecture (18 layers, width 640, its sliding windows) with random weights and the
vocabulary given, in fp32, a LoRA adapter of rank 16 on the seven projections as the recipes train it, and one
training step of our trainer's forward (models.logps.sequence_logps: each pair's prompt run once, the LM head in
chunks on the completion positions only) with DPO's loss against fixed reference log-probs, backward and AdamW.
Every arm runs in a process of its own, so its peak memory is its own: on a GPU torch.cuda.max_memory_allocated,
on a CPU the process's peak resident memory (which includes about 0.4 GB of Python and torch).

Printed per arm: the memory after the model is built (the weights: the tied embedding and head are vocab x 640
floats), after a reference pass (no gradients), and at the end of the training step; the vocabulary's share is what
the arms differ by. Beside them, what the head's logits need by count: completion positions x vocab x 4 bytes, held
once for the log-softmax's backward (the chunks' logits themselves are freed as each is reduced).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def peak_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux


def arm(vocab: int, pairs: int, prompt_len: int, response_len: int) -> dict:
    """One arm, in this process: build, reference pass, one training step; peak memory after each."""
    from peft import LoraConfig, get_peft_model
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from models.logps import Encoded, collate_pairs, sequence_logps
    from models.train.losses import LOSSES, PreferenceBatch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    config = Gemma3TextConfig(  # Gemma 3 270M's config.json, the vocabulary aside
        vocab_size=vocab, hidden_size=640, intermediate_size=2048, num_hidden_layers=18, num_attention_heads=4, num_key_value_heads=1,
        head_dim=256, query_pre_attn_scalar=256, sliding_window=512, max_position_embeddings=32768, rms_norm_eps=1e-6,
        layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 3, tie_word_embeddings=True,
    )
    with device:
        model = Gemma3ForCausalLM._from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=targets))
    built = peak_gb()
    generator = torch.Generator().manual_seed(1)
    draw = lambda n: torch.randint(3, vocab, (n,), generator=generator).tolist()  # noqa: E731
    prompts = [draw(prompt_len) for _ in range(pairs)]
    chosen = [Encoded(p, draw(response_len)) for p in prompts]
    rejected = [Encoded(p, draw(response_len)) for p in prompts]
    batch = {k: v.to(device) for k, v in collate_pairs(chosen, rejected, pad_id=0).items()}
    with torch.no_grad():
        ref, _ = sequence_logps(model, batch)
    after_reference = peak_gb()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    start = time.perf_counter()
    sums, counts = sequence_logps(model, batch)
    pref = PreferenceBatch(policy_chosen_logps=sums[:pairs], policy_rejected_logps=sums[pairs:], ref_chosen_logps=ref[:pairs],
                           ref_rejected_logps=ref[pairs:], beta=0.1)
    LOSSES["dpo_sigmoid"](pref).mean().backward()
    optimizer.step()
    positions = int(batch["completion_mask"].sum())
    return {
        "vocab": vocab, "device": str(device), "parameters": sum(p.numel() for p in model.parameters()),
        "completion_positions": positions, "peak_gb_after_build": round(built, 3), "peak_gb_after_reference_pass": round(after_reference, 3),
        "peak_gb_after_training_step": round(peak_gb(), 3), "step_seconds": round(time.perf_counter() - start, 2),
        "embedding_gb": round(vocab * 640 * 4 / 1e9, 3), "head_logits_gb": round(positions * vocab * 4 / 1e9, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", default="262144,49152", help="comma-separated vocabulary sizes (262,144 is Gemma 3's, 49,152 SmolLM2's)")
    parser.add_argument("--pairs", type=int, default=8, help="pairs in the micro-batch (the recipes' training.batch_size)")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--response-len", type=int, default=32)
    parser.add_argument("--arm", type=int, help=argparse.SUPPRESS)  # run one arm in this process, print its JSON
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.arm:
        print(json.dumps(arm(args.arm, args.pairs, args.prompt_len, args.response_len)))
        return
    results = {"date": time.strftime("%Y-%m-%d"), "load_average": os.getloadavg()[0], "pairs": args.pairs, "prompt_len": args.prompt_len,
               "response_len": args.response_len, "arms": []}
    for vocab in (int(v) for v in args.vocab.split(",")):
        command = [sys.executable, __file__, "--arm", str(vocab), "--pairs", str(args.pairs), "--prompt-len", str(args.prompt_len),
                   "--response-len", str(args.response_len)]
        out = subprocess.run(command, capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": str(REPO)})
        results["arms"].append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(results["arms"][-1]), flush=True)
    first, *others = results["arms"]
    for other in others:
        results[f"difference_{first['vocab']}_vs_{other['vocab']}_gb"] = {
            key: round(first[key] - other[key], 3) for key in ("peak_gb_after_build", "peak_gb_after_reference_pass", "peak_gb_after_training_step",
                                                               "embedding_gb", "head_logits_gb")}
    print(json.dumps({k: v for k, v in results.items() if k != "arms"}, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
