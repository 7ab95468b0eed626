"""Throughput of our `static` backend (static KV cache; a CUDA graph on a GPU) against plain `model.generate`.

One process, one model: `--model` (a directory, a .gguf file or `cache:<name>`, bench/common.py;
fp32 on a CPU, bf16 on a GPU), or random weights of Qwen2.5-0.5B's exact config (a GPU bench).
Prompts of --prompt-len random tokens, --new-tokens new tokens per row, sampling (temperature 1,
top_p 1 unless given). For every batch size it times
  - hf:     model.generate (eager, dynamic cache), min_new_tokens = max_new_tokens so rows are equally
            long, top_k=0 as in models.generate.generation's hf backend;
  - static: models.generate.fast_generation.static_generate with eos_ids=[] so it also makes every token;
            the first call (cache allocation, graph capture on a GPU) is timed apart from the steady state;
  - compiled (with --compile): the same with the decode step torch.compile'd before capture;
and prints new tokens/s and the ratio to hf, plus sampling sanity (same seed repeats, another seed
differs). Each timing is the best of --reps runs after a warm-up. MFU counts 2 N FLOPs per new token
(N = parameters; attention over the cache left out) against the GPU's datasheet peak, or on a CPU
against the fp32 matmul rate measured in this run on the model's layer shapes at that batch size (a
decode step multiplies a few rows by every weight, so reading the weights bounds it, and the matmul
rate of so few rows is its ceiling). --profile prints the costliest operators of three eager decode
steps at the largest batch. Then a greedy-equality check in fp32, HF greedy vs static greedy on
left-padded prompts of mixed lengths (the model's own weights with --model, random weights
otherwise), reporting the fraction of equal tokens and of equal rows.

    python bench/bench_generate.py --model cache:smollm2-135m-instruct --batches 16,64 --new-tokens 64 --prompt-len 64
    python bench/bench_generate.py --batches 32,128,512 --new-tokens 256 --prompt-len 128 --json bench.json   # GPU
    python bench/bench_generate.py --batches 32,128 --compile           # adds the torch.compile'd step (~30 s compile per batch)
    python bench/bench_generate.py --batches 128 --top-p 0.9 --skip-equality   # top-p (sorting the vocabulary each step)
Seen on one H100 (2026-11-22, torch 2.11, transformers 5.17), new tok/s, hf / graph / graph+compile:
batch 32: 1.4k / 9.0k / 17.3k; batch 128: 4.6k / 29.8k / 55.9k; batch 512 (another run): 17.6k /
67.5k / 110.5k. Greedy fp32 equality: 100% of tokens with and without compile.
Smoke test on a CPU (small config, few tokens; numbers mean nothing):
    python bench/bench_generate.py --tiny
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import gpu_peak_flops, layer_shapes, machine, matmul_probe, model_directory  # noqa: E402
from models.generate.fast_generation import _SESSIONS, release_sessions, static_generate  # noqa: E402
from models.packing import PACK_ENV, cpu_packing_available, packed_linears  # noqa: E402
from models.generate.generation import SamplingSettings  # noqa: E402

QWEN25_05B = dict(
    vocab_size=151936,
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    tie_word_embeddings=True,
)
TINY = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    tie_word_embeddings=True,
)


class _Tok:
    pad_token_id = 0


def build_model(config: dict | str, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """Random weights of `config`, or the model in directory `config`."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    if isinstance(config, str):
        return AutoModelForCausalLM.from_pretrained(config, dtype=dtype, attn_implementation="sdpa").to(device).eval()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(Qwen2Config(**config), dtype=dtype, attn_implementation="sdpa")
    return model.to(device).eval()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device):
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - start


def hf_sample(model, input_ids, attention_mask, args):
    """Plain generate as a user writes it: `--samples-per-prompt` samples of each prompt by num_return_sequences."""
    from transformers import GenerationConfig

    config = GenerationConfig(
        do_sample=True,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=0,
        max_new_tokens=args.new_tokens,
        min_new_tokens=args.new_tokens,
        pad_token_id=0,
        num_return_sequences=args.samples_per_prompt,
    )
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
    return out[:, input_ids.shape[1] :]


def static_variants(args, device: torch.device) -> list[tuple[str, str]]:
    """(name, compile mode) of every static-backend variant timed: on a CPU also without packed weights."""
    variants = [("static", "")]
    if device.type == "cpu" and cpu_packing_available():
        variants.append(("static_unpacked", ""))
    return variants + ([("compiled", args.compile)] if args.compile else [])


def with_packing(on: bool, fn, *args, **kwargs):
    """fn(*args, **kwargs) with the CPU's packed weights on or off (SELFPLAY_CPU_PACKED)."""
    saved = os.environ.get(PACK_ENV)
    os.environ[PACK_ENV] = "1" if on else "0"
    try:
        return fn(*args, **kwargs)
    finally:
        if saved is None:
            del os.environ[PACK_ENV]
        else:
            os.environ[PACK_ENV] = saved


@torch.no_grad()
def throughput(args, model, device, vocab: int) -> list[dict]:
    rows = []
    settings = SamplingSettings(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.new_tokens)
    for batch in args.batches:
        gen = torch.Generator().manual_seed(batch)
        if batch % args.samples_per_prompt:
            raise SystemExit(f"--batches: {batch} is not a multiple of --samples-per-prompt {args.samples_per_prompt}")
        prompt_ids = torch.randint(0, min(vocab, 32000), (batch // args.samples_per_prompt, args.prompt_len), generator=gen).to(device)
        # The rows of one batch as models.generate.generation.generate_texts makes them: each prompt's samples adjacent.
        input_ids = prompt_ids.repeat_interleave(args.samples_per_prompt, dim=0)
        attention_mask = torch.ones_like(input_ids)
        new_tokens = batch * args.new_tokens
        row = {"batch": batch, "samples_per_prompt": args.samples_per_prompt, "new_tokens": new_tokens}
        if not args.skip_hf:
            hf_times = []
            for _ in range(args.reps + 1):  # the first is a warm-up
                out, dt = timed(lambda: hf_sample(model, prompt_ids, torch.ones_like(prompt_ids), args), device)
                hf_times.append(dt)
            assert out.shape == (batch, args.new_tokens)
            row["hf_s"] = min(hf_times[1:])
            row["hf_tok_s"] = new_tokens / row["hf_s"]
        for variant, mode in static_variants(args, device):
            release_sessions()
            run = lambda: with_packing(variant != "static_unpacked", static_generate, model, _Tok, input_ids, attention_mask,  # noqa: E731
                                       settings, [], compile_step=mode).tokens
            torch.manual_seed(0)
            first_out, first = timed(run, device)
            assert first_out.shape == (batch, args.new_tokens)
            session = _SESSIONS.get(model)
            row[f"{variant}_graph"] = bool(session is not None and session.graph is not None)
            row[f"{variant}_first_call_s"] = first
            times = []
            for _ in range(args.reps):
                torch.manual_seed(0)
                out, dt = timed(run, device)
                times.append(dt)
            row[f"{variant}_s"] = min(times)
            row[f"{variant}_tok_s"] = new_tokens / row[f"{variant}_s"]
            # sampling sanity: the same seed repeats itself (fresh vs reused session), another seed does not
            row[f"{variant}_same_seed_equal"] = bool(torch.equal(out, first_out))
            torch.manual_seed(1)
            row[f"{variant}_other_seed_differs"] = not torch.equal(run(), first_out)
            row[f"{variant}_distinct_tokens"] = int(out.unique().numel())
            if "hf_tok_s" in row:
                row[f"{variant}_speedup"] = row[f"{variant}_tok_s"] / row["hf_tok_s"]
        if device.type == "cuda":
            row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
            torch.cuda.reset_peak_memory_stats()
        release_sessions()
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


@torch.no_grad()
def profile_steps(args, model, device, vocab: int, steps: int = 3) -> None:
    """Kernel times of `steps` decode steps run eagerly (a graph replays the same kernels), on a CPU with
    the packed weights static_generate decodes with."""
    from torch.profiler import ProfilerActivity, profile

    from contextlib import nullcontext

    from models.generate.fast_generation import _attention

    batch = max(args.batches)
    input_ids = torch.randint(0, min(vocab, 32000), (batch, args.prompt_len)).to(device)
    settings = SamplingSettings(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.new_tokens)
    static_generate(model, _Tok, input_ids, torch.ones_like(input_ids), settings, [], cuda_graph=False)
    session = _SESSIONS[model]
    packing = packed_linears(model, batch) if device.type == "cpu" else nullcontext()  # as static_generate runs it
    with _attention(model, session.attention), packing:
        session.prefill(model, input_ids, torch.ones_like(input_ids))
        session.step()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            for _ in range(steps):
                session.step()
            sync(device)
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    print(f"profile: batch {batch}, {steps} eager decode steps")
    print(prof.key_averages().table(sort_by=sort, row_limit=18, max_name_column_width=60))
    release_sessions()


def compare_greedy(model, batches, new_tokens: int, eos_ids: list[int], pad_id: int, compile_mode: str = "") -> dict:
    """HF greedy vs static greedy over `batches` of left-padded (input_ids, attention_mask), each row compared
    up to its eos. Where a row differs, HF's margin between its two best logits at the first difference
    says whether that step was a near tie (float rounding can break one either way) or a real disagreement."""
    from transformers import GenerationConfig

    from models.generate.generation import cut_at_eos

    tokens = equal_tokens = rows = equal_rows = 0
    differences = []
    for input_ids, attention_mask in batches:
        width = input_ids.shape[1]
        config_hf = GenerationConfig(do_sample=False, max_new_tokens=new_tokens, eos_token_id=eos_ids or None, pad_token_id=pad_id,
                                     output_scores=True, return_dict_in_generate=True)
        # As models.generate.sampling.hf_generate: none of the model's own generation_config (its eos id, which
        # min_new_tokens would suppress) is merged in, so both sides decode the same distribution.
        saved, model.generation_config = model.generation_config, GenerationConfig()
        try:
            out = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config_hf)
        finally:
            model.generation_config = saved
        ref = out.sequences[:, width:]
        greedy = SamplingSettings(temperature=0, max_new_tokens=new_tokens)
        ours = static_generate(model, _Tok, input_ids, attention_mask, greedy, eos_ids, compile_step=compile_mode).tokens
        for row in range(ref.shape[0]):
            a, b = cut_at_eos(ref[row].tolist(), eos_ids), cut_at_eos(ours[row].tolist(), eos_ids)
            first = next((i for i in range(min(len(a), len(b))) if a[i] != b[i]), None if len(a) == len(b) else min(len(a), len(b)))
            rows += 1
            tokens += len(a)
            equal_rows += first is None
            equal_tokens += len(a) if first is None else first
            if first is not None and first < len(out.scores):
                top = out.scores[first][row].float().topk(2).values
                differences.append({"row": rows - 1, "first_difference": first, "hf_top2_margin": float(top[0] - top[1])})
    return {"rows": rows, "tokens": tokens, "token_match": equal_tokens / max(1, tokens), "rows_equal": equal_rows / max(1, rows),
            "differences": differences}


@torch.no_grad()
def greedy_equality(args, config: dict | str, device: torch.device, dtype: torch.dtype, label: str, compile_mode: str = "") -> dict:
    """HF greedy vs static greedy on left-padded random prompts of mixed lengths, every row `--eq-new-tokens` long."""
    model = build_model(config, dtype, device, seed=1)
    vocab = model.config.vocab_size
    batch, new = args.eq_batch, args.eq_new_tokens
    gen = torch.Generator().manual_seed(7)
    copies = args.samples_per_prompt if batch % args.samples_per_prompt == 0 else 1
    lengths = torch.randint(max(1, args.prompt_len // 8), args.prompt_len + 1, (batch // copies,), generator=gen).tolist()
    width = max(lengths)
    input_ids = torch.zeros((len(lengths), width), dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for i, length in enumerate(lengths):
        input_ids[i, width - length :] = torch.randint(1, min(vocab, 32000), (length,), generator=gen)
        attention_mask[i, width - length :] = 1
    if copies > 1:  # repeated prompts take the shared prefill; greedy copies of a prompt are equal rows
        input_ids, attention_mask = input_ids.repeat_interleave(copies, 0), attention_mask.repeat_interleave(copies, 0)
    result = {"check": label, "prompts": "random tokens", "batch": batch, "new_tokens": new,
              **compare_greedy(model, [(input_ids.to(device), attention_mask.to(device))], new, [], 0, compile_mode)}
    del model
    release_sessions()
    print(json.dumps(result), flush=True)
    return result


@torch.no_grad()
def chat_greedy_equality(args, model_dir: str, device: torch.device) -> dict:
    """HF greedy vs static greedy in fp32 on what generation really sees: the demo's held-out prompts in the
    model's chat template, batches of --eq-batch, each row up to its end of turn or --eq-new-tokens."""
    from transformers import AutoTokenizer

    from configs.recipe import DataConfig
    from data.prompts import format_prompt, load_prompts
    from models.padding import pad_rows

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = build_model(model_dir, torch.float32, device)
    prompts = load_prompts("demo:heldout", "test", DataConfig()).head(args.eq_prompts)
    encoded = [tokenizer(format_prompt(tokenizer, p, None), add_special_tokens=False).input_ids for p in prompts.prompt]
    batches = []
    for start in range(0, len(encoded), args.eq_batch):
        input_ids, attention_mask = pad_rows(encoded[start : start + args.eq_batch], tokenizer.pad_token_id, side="left")
        batches.append((input_ids.to(device), attention_mask.to(device)))
    result = {"check": "greedy fp32, chat prompts", "prompts": "demo:heldout", "batch": args.eq_batch, "new_tokens": args.eq_new_tokens,
              **compare_greedy(model, batches, args.eq_new_tokens, [tokenizer.eos_token_id], tokenizer.pad_token_id)}
    del model
    release_sessions()
    print(json.dumps(result), flush=True)
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a model directory, a .gguf file or cache:<name>; default: random Qwen2.5-0.5B weights (GPU)")
    parser.add_argument("--batches", default="32,128", help="comma-separated batch sizes (default 32,128)")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--samples-per-prompt", type=int, default=1,
                        help="rows per distinct prompt in a batch (a recipe's generation.num_samples); plain generate "
                             "gets them by num_return_sequences, ours prefills each prompt once")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--reps", type=int, default=2, help="timed runs after the warm-up; the best counts")
    parser.add_argument("--compile", nargs="?", const="default", default="",
                        help="also time the static backend with its decode step torch.compile'd in this mode "
                        "(default: 'default'; max-autotune-no-cudagraphs measured slower and compiles 5x longer)")
    parser.add_argument("--skip-hf", action="store_true", help="time only the static backend")
    parser.add_argument("--skip-equality", action="store_true")
    parser.add_argument("--eq-batch", type=int, default=32)
    parser.add_argument("--eq-new-tokens", type=int, default=64)
    parser.add_argument("--eq-prompts", type=int, default=64,
                        help="with --model: held-out demo prompts in the model's chat template for a second greedy check (0: none)")
    parser.add_argument("--tiny", action="store_true", help="small config and few tokens: a CPU smoke test")
    parser.add_argument("--profile", action="store_true", help="print the costliest operators of a few eager decode steps")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    args.batches = [int(b) for b in str(args.batches).split(",") if b]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config: dict | str = QWEN25_05B
    if args.model:
        config = model_directory(args.model)
    elif args.tiny:
        config = TINY
        args.new_tokens, args.prompt_len = min(args.new_tokens, 16), min(args.prompt_len, 16)
        args.batches = sorted({min(b, 8) for b in args.batches})
        args.eq_batch, args.eq_new_tokens, args.reps = min(args.eq_batch, 4), min(args.eq_new_tokens, 8), 1
    elif device.type != "cuda":
        parser.error("random Qwen2.5-0.5B weights need a CUDA GPU; give --model for a CPU run, or --tiny for a smoke test")
    import transformers

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_model(config, dtype, device)
    n_params = sum(p.numel() for p in model.parameters())
    env = {
        **machine(),
        "transformers": transformers.__version__,
        "model": args.model or ("tiny" if args.tiny else "Qwen2.5-0.5B (random weights)"),
        "parameters": n_params,
        "dtype": str(dtype).removeprefix("torch."),
        "prompt_len": args.prompt_len,
        "samples_per_prompt": args.samples_per_prompt,
        "new_tokens": args.new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "compile": args.compile or None,
        "cuda_graph_env": os.environ.get("SELFPLAY_STATIC_CUDA_GRAPH", "1"),
    }
    print(json.dumps(env), flush=True)
    vocab = model.config.vocab_size
    if args.profile:
        profile_steps(args, model, device, vocab)
    rows = throughput(args, model, device, vocab)
    for row in rows:
        if device.type == "cuda":
            peak = gpu_peak_flops(env["gpu"])
        else:  # the ceiling of a decode step: a matmul of `batch` rows by the model's weights, measured now
            row["matmul_probe"] = matmul_probe(layer_shapes(model.config, row["batch"]))
            peak = row["matmul_probe"]["best_gflops_per_s"] * 1e9
        for variant in ("hf", "static", "static_unpacked", "compiled"):
            if f"{variant}_tok_s" in row and peak:
                row[f"{variant}_mfu_percent"] = round(2 * n_params * row[f"{variant}_tok_s"] / peak * 100, 1)
    del model
    release_sessions()
    checks = []
    if not args.skip_equality:
        checks.append(greedy_equality(args, config, device, torch.float32, "greedy fp32"))
        if args.model and args.eq_prompts:
            checks.append(chat_greedy_equality(args, config, device))
        if args.compile:
            checks.append(greedy_equality(args, config, device, torch.float32, f"greedy fp32, compiled ({args.compile})", args.compile))
        if device.type == "cuda":
            checks.append(greedy_equality(args, config, device, torch.bfloat16, "greedy bf16 (near ties: informative only)"))
    print()
    variants = [name for name, _ in static_variants(args, device)]
    print(f"{'batch':>6} {'hf tok/s':>10} {'MFU':>6}" + "".join(f" {v + ' tok/s':>15} {'x hf':>6} {'MFU':>6} {'1st call s':>10}" for v in variants))
    for row in rows:
        line = f"{row['batch']:>6} " + (f"{row['hf_tok_s']:10.0f} {row.get('hf_mfu_percent', 0):5.1f}%" if "hf_tok_s" in row else f"{'-':>10} {'-':>6}")
        for v in variants:
            speedup = f"{row[v + '_speedup']:5.2f}x" if v + "_speedup" in row else f"{'-':>6}"
            line += f" {row[v + '_tok_s']:15.0f} {speedup} {row.get(v + '_mfu_percent', 0):5.1f}% {row[v + '_first_call_s']:10.2f}"
        print(line)
    for check in checks:
        print(f"{check['check']}: {check['token_match']:.4f} of tokens, {check['rows_equal']:.3f} of rows equal")
    results = {"env": env, "throughput": rows, "greedy_equality": checks}
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
