"""Sampling responses: K samples per prompt, length-sorted batches, fixed seeds, OOM back-off.

`generate_texts(model, tokenizer, prompt_texts, settings)` returns, for every prompt text (already
chat-formatted by data.prompts.format_prompt), `num_samples` `Sample`s in order. Backends:

- `hf`: transformers' `generate` (dynamic cache), the reference behaviour (models/generate/sampling.py);
- `static`: models/generate/fast_generation.py, our static-KV-cache decode loop, CUDA-graph captured on a GPU;
- `vllm`: vLLM's offline engine when it is installed (optional, never in CI; models/generate/vllm_engine.py).

Prompts are sorted by length before batching so a batch pads little; results come back in input order.
Every batch is seeded from (seed, batch position), so the same inputs give the same samples. On CUDA
out-of-memory the batch size is halved and the batch retried (logged), instead of failing a long round.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from common import interrupt
from common.errors import Interrupted
from models.padding import pad_rows
from models.generate.sampling import Sample, SamplingSettings, hf_generate

if TYPE_CHECKING:  # annotations only: pandas loads inside the functions that use it
    import pandas as pd

log = logging.getLogger("selfplay")


def _eos_ids(model, tokenizer) -> list[int]:
    ids = model.generation_config.eos_token_id if model.generation_config is not None else None
    ids = ids if isinstance(ids, list) else [ids] if ids is not None else []
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def cut_at_eos(row: list[int], eos_ids: list[int]) -> list[int]:
    """A row of new tokens up to and including its first eos (what follows it is padding)."""
    end = next((i for i, tok in enumerate(row) if tok in eos_ids), None)
    return row if end is None else row[: end + 1]


def _decode(tokenizer, new_tokens: torch.Tensor, eos_ids: list[int], logps: torch.Tensor | None = None) -> list[Sample]:
    from data.prompts import clean_response

    samples = []
    row_logps = [None] * new_tokens.shape[0] if logps is None else logps.tolist()
    for row, logp in zip(new_tokens.tolist(), row_logps):
        sampled = cut_at_eos(row, eos_ids)
        finished = bool(sampled) and sampled[-1] in eos_ids
        text = tokenizer.decode(sampled[:-1] if finished else sampled, skip_special_tokens=True)
        samples.append(Sample(text=clean_response(text), num_tokens=len(sampled), finished=finished, token_ids=sampled, logp=logp))
    return samples


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def run_with_oom_backoff(work, items: list, batch_size: int, what: str) -> list:
    """Apply `work(batch_items) -> list` over `items` in batches, halving the batch on CUDA OOM."""
    results, start = [], 0
    while start < len(items):
        chunk = items[start : start + batch_size]
        try:
            results.extend(work(chunk))
            start += len(chunk)
        except (torch.cuda.OutOfMemoryError, RuntimeError) as exc:
            if not is_oom(exc) or batch_size == 1:
                raise
            batch_size = max(1, batch_size // 2)
            log.warning("%s: CUDA out of memory; retrying with batch size %d", what, batch_size)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return results


def generate_texts(model, tokenizer, prompt_texts: list[str], settings: SamplingSettings, progress: str | None = None) -> list[list[Sample]]:
    """`settings.num_samples` samples for each prompt text, in input order (backends hf and static;
    vLLM takes a model path, not a loaded model: see generate_round); the first `settings.greedy_samples`
    of each prompt greedy, in the same batches as the sampled ones."""
    return _generate(model, tokenizer, prompt_texts, settings, progress)[0]


def generate_and_score(model, tokenizer, prompt_texts: list[str], settings: SamplingSettings, continuations: list[list[list[int]]],
                       progress: str | None = None, later=None) -> tuple[list[list[Sample]], list[list[float]]]:
    """generate_texts, and for each prompt the summed log-prob under the model of each of `continuations[p]`
    (token-id lists that follow the prompt's ids), then of each of `later(p, samples)`: continuations that
    depend on the prompt's samples (all of them, in order). The static backend scores them from its prefill's
    run of the prompt (models.logps.cached_prompt_logps; `later`'s after decoding, on a copy of that run), so
    the prompts run once for all; the hf backend, a model the static backend hands to it, or a prompt whose
    samples fell into two batches, scores them in a log-prob pass of their own afterwards."""
    return _generate(model, tokenizer, prompt_texts, settings, progress, continuations, later)


@torch.no_grad()
def _generate(model, tokenizer, prompt_texts: list[str], settings: SamplingSettings, progress: str | None = None,
              continuations: list[list[list[int]]] | None = None, later=None) -> tuple[list[list[Sample]], list[list[float]] | None]:
    from common.progress import bar

    device = next(model.parameters()).device
    eos_ids = _eos_ids(model, tokenizer)
    encoded = [tokenizer(text, add_special_tokens=False).input_ids for text in prompt_texts]
    # One row per (prompt, sample); rows sorted by prompt length so batches pad little.
    rows = [(p, k) for p in range(len(encoded)) for k in range(settings.num_samples)]
    rows.sort(key=lambda row: (len(encoded[row[0]]), row))
    if settings.backend == "static":
        from models.generate.fast_generation import static_generate as backend
    else:
        backend = hf_generate
    model.eval()
    progress_bar = bar(total=len(rows), desc=progress, disable=progress is None)
    batch_counter = [0]

    # A prompt's continuations are scored in the batch that holds its first row.
    score_in_prefill = continuations is not None and settings.backend == "static"

    def work(chunk):
        # Left padding: every row's last prompt token is at the end.
        input_ids, attention_mask = pad_rows([encoded[p] for p, _ in chunk], tokenizer.pad_token_id, side="left")
        torch.manual_seed(settings.seed * 1_000_003 + batch_counter[0])
        greedy_rows = torch.tensor([k < settings.greedy_samples for _, k in chunk]) if settings.greedy_samples else None
        extra = {"continuations": [continuations[p] if k == 0 else [] for p, k in chunk]} if score_in_prefill else {}
        whole = _whole_prompts(chunk, settings.num_samples) if score_in_prefill and later is not None else set()
        decoded: list[Sample] = []  # `later` decodes the rows once; the results below reuse them

        def later_rows(new_tokens, logps):
            decoded.extend(_decode(tokenizer, new_tokens, eos_ids, logps))
            return _later_rows(chunk, whole, decoded, later)

        if whole:
            extra["later"] = later_rows
        out = backend(model, tokenizer, input_ids.to(device), attention_mask.to(device), settings, eos_ids, greedy_rows=greedy_rows,
                      **extra)
        if settings.backend == "static":  # a StaticGeneration
            new_tokens, logps, scores, later_scores = out
            if scores is not None and later is not None:  # a prompt's later scores follow its own, or None: scored afterwards
                scores = [s + later_scores[i] if later_scores is not None and chunk[i][0] in whole else None
                          for i, s in enumerate(scores)]
        else:
            (new_tokens, logps), scores = out if settings.logps else (out, None), None
        batch_counter[0] += 1
        progress_bar.update(len(chunk))
        return list(zip(decoded or _decode(tokenizer, new_tokens, eos_ids, logps), scores or [None] * len(chunk)))

    flat = run_with_oom_backoff(work, rows, settings.batch_size, "generation")
    progress_bar.close()
    out: list[list[Sample]] = [[None] * settings.num_samples for _ in encoded]  # type: ignore[list-item]
    scored: list[list[float] | None] = [None] * len(encoded)
    for (p, k), (sample, scores) in zip(rows, flat):
        out[p][k] = sample
        if k == 0:
            scored[p] = scores
    if continuations is None:
        return out, None
    missing = [p for p, scores in enumerate(scored) if scores is None]
    if missing:
        from models.logps import Encoded, batched_logps

        wanted = {p: continuations[p] + (later(p, out[p]) if later is not None else []) for p in missing}
        items = [Encoded(encoded[p], ids) for p in missing for ids in wanted[p]]
        sums = iter(batched_logps(model, tokenizer, items, settings.batch_size, device)[0])
        for p in missing:
            scored[p] = [next(sums) for _ in wanted[p]]
    return out, scored


def _whole_prompts(chunk: list[tuple[int, int]], num_samples: int) -> set[int]:
    """The prompts all of whose samples are rows of `chunk` ((prompt, sample) rows)."""
    counts: dict[int, int] = {}
    for p, _ in chunk:
        counts[p] = counts.get(p, 0) + 1
    return {p for p, n in counts.items() if n == num_samples}


def _later_rows(chunk: list[tuple[int, int]], whole: set[int], samples: list[Sample], later) -> list[list[list[int]]]:
    """What `later(p, p's samples in order)` asks to score for each prompt of `whole`, at the row of its first sample."""
    by_prompt: dict[int, dict[int, Sample]] = {}
    for (p, k), sample in zip(chunk, samples):
        by_prompt.setdefault(p, {})[k] = sample
    return [later(p, [by_prompt[p][j] for j in sorted(by_prompt[p])]) if k == 0 and p in whole else [] for p, k in chunk]


# --- the Generate stage -------------------------------------------------------------------------

def shard_seed(seed: int, round_idx: int, shard_idx: int) -> int:
    return seed * 1_000_003 + round_idx * 10_007 + shard_idx


@interrupt.safe_points("generation part")  # a signal stops the loop below between parts, once one is saved
def generate_round(recipe, model_path: str, prompts, round_idx: int, work_dir, root_path: str | None = None,
                   shard: tuple[int, int] = (0, 1)) -> tuple["pd.DataFrame", dict]:
    """Sample `generation.num_samples` responses per prompt with the model at `model_path` (a base model, or
    a round checkpoint loaded as `root_path` + its adapter: models.load.loading.load_policy).

    Work is split into parts of `generation.shard_size` prompts, each written atomically to `work_dir` with its
    own seed, so a killed run resumes at the first missing part and still produces the same samples. A
    SIGTERM or SIGINT (common/interrupt.py) lets the part being generated finish and be saved, then stops.
    `shard` = (shard_idx, shards): generate only that shard's block of the parts (data.layout.shard_range),
    for the Luigi shard tasks; a part's samples depend on its index alone, so the shards' frames, put
    together in order, are the frame of one unsharded call.
    Returns the generations frame (contract columns plus reference/task/answer/source_row/system) and stats
    (generation_stats: of the shard's rows, with the round's prompt counts).
    """
    import functools
    from pathlib import Path

    import pandas as pd

    from data.layout import shard_range
    from data.prompts import filter_overlong, format_prompt
    from data.schema import write_parquet
    from models.load.loading import load_policy, load_tokenizer

    work_dir = Path(work_dir)
    gen = recipe.generation
    tokenizer = load_tokenizer(model_path, recipe.model)
    # The limit leaves room for a full-length sample in training.max_length, so no prompt is cut in training.
    limit = recipe.prompt_token_limit
    limit_name = "data.max_prompt_tokens" if limit == recipe.data.max_prompt_tokens else "training.max_length - generation.max_new_tokens"
    prompts, dropped = filter_overlong(prompts, tokenizer, limit, recipe.data.overlong_prompts, recipe.data.train, limit_name)
    if dropped:
        log.info("generation: skipped %d prompts longer than %s=%d", dropped, limit_name, limit)
    # Loaded at the first part that needs it: a resumed run whose parts are all saved loads nothing.
    load_model = functools.cache(lambda: load_policy(model_path, recipe.model, quantize=recipe.model.quantization == "4bit",
                                                     root=root_path, packed=gen.backend == "static"))
    parts = []
    starts = range(0, len(prompts), gen.shard_size)
    own_parts = shard_range(len(starts), *shard)  # the parts of the round this shard generates
    for part_idx in own_parts:  # the part's index in the round, which seeds it
        part_path = work_dir / f"part-{part_idx:05d}.parquet"
        if part_path.is_file():
            parts.append(pd.read_parquet(part_path))
            continue
        if interrupt.received():  # a SIGTERM/SIGINT came while the previous part was generated; it is saved
            raise Interrupted(
                f"{interrupt.received()}: generation of round {round_idx} stopped with {len(parts)} of {len(own_parts)} "
                f"parts saved in {work_dir}; rerun the same command to resume"
            )
        part_prompts = prompts.iloc[starts[part_idx] : starts[part_idx] + gen.shard_size]
        texts = [format_prompt(tokenizer, p, s) for p, s in zip(part_prompts.prompt, part_prompts.system)]
        settings = SamplingSettings(num_samples=gen.num_samples, temperature=gen.temperature, top_p=gen.top_p,
                                    max_new_tokens=gen.max_new_tokens, batch_size=gen.batch_size,
                                    seed=shard_seed(recipe.seed, round_idx, part_idx), backend=gen.backend)
        if gen.backend == "vllm":
            samples = sample_with_vllm(recipe, model_path, root_path, tokenizer, texts, settings)
        else:
            samples = generate_texts(load_model(), tokenizer, texts, settings, progress=f"generate r{round_idx} part {part_idx}")
        part = part_frame(part_prompts, samples, round_idx)
        write_parquet(part, part_path)
        parts.append(part)
    frame = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()  # a shard with no parts: more shards than parts
    return frame, generation_stats(frame, len(prompts), dropped)


def sample_with_vllm(recipe, model_path: str, root_path: str | None, tokenizer, texts: list[str], settings: SamplingSettings):
    """One part's samples from vLLM: a round checkpoint runs as its root weights with the round's adapter as a
    LoRA request, a base model as itself."""
    from models.generate.vllm_engine import vllm_generate
    from models.load.loading import checkpoint_info, is_round_checkpoint, round_adapter

    tensor_parallel_size = recipe.generation.tensor_parallel_size
    if is_round_checkpoint(model_path):
        root = root_path or checkpoint_info(model_path)["root_path"]
        return vllm_generate(root, tokenizer, texts, settings, recipe.model, adapter=round_adapter(model_path),
                             tensor_parallel_size=tensor_parallel_size)
    return vllm_generate(model_path, tokenizer, texts, settings, recipe.model, tensor_parallel_size=tensor_parallel_size)


def part_frame(part_prompts: "pd.DataFrame", samples, round_idx: int) -> "pd.DataFrame":
    """A part's rows: each prompt's columns the later stages carry, beside each of its samples."""
    import pandas as pd

    rows = [
        {
            **{k: row[k] for k in ("prompt_id", "prompt", "system", "reference") if k in row},
            **{k: row.get(k) for k in ("task", "answer", "source_row") if k in part_prompts.columns},
            "response": sample.text,
            "sample_index": k,
            "round": round_idx,
            "num_tokens": sample.num_tokens,
            "finished": sample.finished,
            "token_ids": sample.token_ids,
        }
        for row, row_samples in zip(part_prompts.to_dict("records"), samples)
        for k, sample in enumerate(row_samples)
    ]
    return pd.DataFrame(rows)


def generation_stats(frame: "pd.DataFrame", prompts: int, dropped: int) -> dict:
    """generate_meta.json: the round's prompt counts, and figures of the samples in `frame`."""
    return {
        "prompts": int(prompts),
        "prompts_too_long": int(dropped),
        "samples": int(len(frame)),
        "mean_new_tokens": float(frame.num_tokens.mean()) if len(frame) else None,
        "unfinished_fraction": float(1 - frame.finished.mean()) if len(frame) else None,
    }
