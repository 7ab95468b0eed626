"""Fast sampling: our static-KV-cache decode loop (CUDA-graph captured, prompts shared by their samples
prefilled once).

Why not `model.generate`
------------------------
Plain `generate` with a dynamic cache is bound by the host: each new token costs a Python walk through
every layer, the logits processors, stopping criteria and a device sync, so a small model leaves the
GPU mostly idle (bench/README.md has the measured figures). The fix is the gpt-fast recipe: make
one decode step a fixed-shape computation and replay it as a CUDA graph, so a step costs one launch.

`static_generate` (the `static` backend of models.generate.generation.generate_texts)
----------------------------------------------------------------------------
- **Static KV cache.** transformers' `StaticCache(config=..., max_cache_len=L)` preallocates
  `[batch, kv_heads, L, head_dim]` per layer and writes new keys/values in place (its layers keep a
  device tensor `cumulative_length` as the write offset), so tensor addresses never change. `L` is
  the prompt width plus `max_new_tokens`, rounded up to 64 on a GPU so nearby prompt widths share it.
- **Our own masks and positions.** The model gets a ready 4D mask `[batch, 1, q, L]` (transformers
  passes a 4D mask through as is): key `j` is visible when it is a real prompt token or an already
  generated token, and, in the prefill, `j <= i`. Each query also sees itself, so left-padding rows
  never have an all-masked row (which gives NaN in some kernels; padding keys stay hidden from real
  tokens, so their values never matter). The mask is boolean for `sdpa` and additive (0 / dtype min)
  for `eager`. Position ids follow the left padding: `cumsum(attention_mask) - 1` in the prefill,
  then `+ 1` per step for every row, exactly as `generate` does.
- **Our attention function** (`static_sdpa_attention`, registered with transformers'
  AttentionInterface and swapped in for `sdpa` models only while we run them): some transformers
  versions copy the whole key/value cache for grouped-query attention each step when a mask is given
  (`repeat_kv`); for the one-token step we fold each key/value head's query heads into the query axis
  instead, so the cache is read once, never copied: the largest single gain (bench/README.md).
  SELFPLAY_STATIC_ATTENTION=0 keeps the model's own `sdpa`.
- **Prefill** runs the whole left-padded batch in one forward (`logits_to_keep=1`, so the
  `[batch, prompt, vocab]` logits are never built), and samples the first token. When rows repeat a
  prompt (the K samples of each prompt, which generate_texts keeps adjacent), each distinct prompt runs
  once into a dynamic cache whose keys and values are copied into all its rows of the static cache:
  1/K of the prefill's FLOPs for the same cache and logits (`generate(num_return_sequences=K)` expands
  the prompts before its prefill). On a CPU, where a step cannot be replayed as a graph, this is the
  backend's main gain when K > 1 (bench/README.md). Tokens every prompt of the batch starts with (a chat
  template's system turn) are moved to the first columns and run once (`_prefix_first`), and token-id
  continuations given per row are scored on the prompts' own run (`continuations`: Evaluate's
  held-out pairs, models.logps.cached_prompt_logps).
- **Decode step** = one-token forward + sampling + bookkeeping, all on device with fixed shapes and
  static buffers: mark the new key slot valid, run the model, sample (greedy when temperature is 0,
  else temperature and top-p with the same rule as transformers' TopPLogitsWarper, then one draw:
  `sample_next_tokens`), write the token into the output buffer at the step index, pad rows that
  already ended, update `done`, and advance tokens/positions/indices in place. Rows marked greedy
  (`greedy_rows`: Evaluate's greedy answers beside its KL samples) take the argmax instead; with
  `settings.logps` each row's log-prob of its tokens is summed on the way, from the same logits.
  Everything the step reads and writes lives in buffers whose addresses never change, so:
- **CUDA graph.** On CUDA the step is warmed up on a side stream, then captured once in a
  `torch.cuda.CUDAGraph` and replayed for every new token. `torch.rand` inside the graph draws from
  the default CUDA generator, which PyTorch registers with graph capture (each replay gets fresh
  philox offsets), so sampling stays random across steps yet reproducible under `torch.manual_seed`.
  Optionally (`compile_step=True` or SELFPLAY_STATIC_COMPILE=1) the step is first compiled with
  `torch.compile` (mode "default"; another mode by name, e.g. SELFPLAY_STATIC_COMPILE=
  max-autotune-no-cudagraphs) and the compiled step is what gets captured: inductor fuses the norms,
  rotary embedding, activation and sampling, so a step launches far fewer kernels. "default" is what
  True means: max-autotune-no-cudagraphs was slower after a longer compile (bench/README.md has both).
  Compiling costs time for every new session shape, so it pays off for long generation stages with
  few distinct (batch, cache length) shapes; it is off by default.
- **Early stop** when every row has produced an eos, checked every `check_every` steps (16 on CUDA)
  so the loop does not sync each step. Rows that ended are filled with the pad id.
- **Compaction (CPU).** A CPU step costs about in proportion to its rows, so once a quarter of the rows
  a step runs have ended, the live ones move to the first slots of the cache and buffers and the next
  steps run those alone (`_Session.compact`); the random numbers stay those of each batch row, so the
  tokens are the whole batch's up to float rounding (packed weights compute each row alone; the CPU
  attention kernel splits its work by batch size). SELFPLAY_CPU_COMPACT=0 turns it off.
- **Reuse.** The cache, buffers and captured graph (a "session") are kept per model (weakly: they go
  with the model) and reused while batch size, cache length, sampling settings, eos ids and the
  weights' addresses are the same, so `generate_texts` captures once per shape, not once per batch.
  Only the last session per model is kept; `release_sessions()` frees them.
- **Only `settings` decide sampling.** The model's `generation_config` (top_k, repetition penalty,
  temperature...) is never read; greedy is a plain argmax, as in `generate(do_sample=False)`.
- **On CPU** the same step function runs eagerly, on the fp32 weights packed once for oneDNN
  (models/packing.py), and samples without sorting the vocabulary (`_sample_on_cpu`); greedy outputs
  equal `model.generate(do_sample=False)` token for token in fp32 (tests/stages/generate/test_fast_generation on tiny
  models, tests/test_real_model on SmolLM2; bench/README.md has the speed).

Supported: decoder-only HF causal LMs whose layers are all full attention, with `sdpa` or `eager`
attention (checked: Llama and Qwen2), and families that mix full and sliding-window layers and take one
mask per layer type (models.logps.MASK_MAPPING_MODEL_TYPES, checked: Gemma 3): there every layer's static
cache keeps every key in its slot (transformers' sliding layers keep a rolling window of slots instead),
each key slot's token position is kept beside it (`kv_pos`), and the sliding layers' masks hide keys a
window or more positions before the query, counted in positions, not slots (a shared prefix moves tokens
to other slots). A config with one `sliding_window` for every layer and no `layer_types` (Mistral, Phi-3,
Starcoder2) runs here when prompt plus new tokens fit in the window (where it masks nothing), and falls
back to `hf` when they do not. Anything else (other hybrid layers, flash/flex attention, encoder-decoder)
falls back to the `hf` backend with a warning, as does a failed capture (to the eager step). Beam search,
repetition penalties and top-k are not implemented.

The `vllm` backend is models/generate/vllm_engine.py.
"""

from __future__ import annotations

import copy
import inspect
import logging
import os
import weakref
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

import models.logps
from models.packing import env_flag as _env_flag, packed_linears, release_packed
from models.generate.sampling import SamplingSettings

log = logging.getLogger("selfplay")

__all__ = [
    "static_generate",
    "StaticGeneration",
    "release_sessions",
    "sample_next_tokens",
    "static_sdpa_attention",
    "unsupported_reason",
]

CUDA_CACHE_ROUND = 64  # cache lengths rounded up to this on CUDA so sessions are reused across prompt widths
COMPACT_ENV = "SELFPLAY_CPU_COMPACT"  # 0: a CPU decode keeps running rows that ended (_Session.compact)


# --- sampling -------------------------------------------------------------------------------------


TOP_P_CANDIDATES = 256  # on a CPU, the nucleus is looked for among this many most likely tokens first


def sample_next_tokens(logits: torch.Tensor, temperature: float, top_p: float, uniform: torch.Tensor | None = None) -> torch.Tensor:
    """Next token per row from `[batch, vocab]` logits.

    temperature <= 0: argmax. Otherwise logits / temperature, then top-p as transformers'
    TopPLogitsWarper does it (drop the least likely tokens whose cumulative probability stays <= 1 - p,
    always keeping the most likely one), then one draw from what is left, renormalised.
    On CUDA every step is one with no host sync (safe inside a CUDA graph): a full sort for top-p, and
    Gumbel-max: argmax(logits - log(-log(u))), u ~ U[0, 1), which samples from softmax(logits);
    dropped tokens are -inf and can never win. On a CPU, where a sort of the vocabulary and a uniform
    number per token cost more than the rest of the sampling together (SmolLM2, 16 rows: 39 and 6 ms a
    step), `_sample_on_cpu` draws the same distribution with less work; `uniform` (`[batch, 1]` float64 in
    [0, 1), CPU only) are its random numbers, drawn here when not given.
    """
    if temperature <= 0:
        return logits.argmax(dim=-1)
    scores = logits.clone() if logits.dtype == torch.float32 else logits.float()  # a copy: in-place ops follow
    if temperature != 1.0:
        scores.div_(temperature)
    if scores.device.type == "cpu":
        return _sample_on_cpu(scores, top_p, uniform)
    if top_p < 1.0:
        scores = scores.masked_fill(_outside_nucleus(scores, top_p), float("-inf"))
    noise = torch.rand_like(scores).log_().neg_().log_()  # -Gumbel noise: log(-log(u))
    return scores.sub_(noise).argmax(dim=-1)


def _token_logps(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[token] per row, in float32: the model's own log-prob of the token, whatever the
    temperature or top-p it was drawn with (what models.logps scores a sequence by)."""
    return logits.float().log_softmax(dim=-1).gather(1, tokens[:, None]).squeeze(1)


def _outside_nucleus(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """True where TopPLogitsWarper drops a token: the ascending cumulative probability is <= 1 - top_p."""
    sorted_scores, sorted_idx = torch.sort(scores, dim=-1, descending=False)
    cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = cumulative <= (1.0 - top_p)
    drop_sorted[:, -1:] = False  # the most likely token always stays
    return drop_sorted.scatter(1, sorted_idx, drop_sorted)


def _sample_on_cpu(scores: torch.Tensor, top_p: float, uniform: torch.Tensor | None = None) -> torch.Tensor:
    """One token per row from softmax(scores) within the top-p nucleus, by inverse transform sampling.

    Top-p: a token stays when the probability of the tokens more likely than it is below top_p, which is
    TopPLogitsWarper's rule read from the other end. When, in every row, the TOP_P_CANDIDATES most likely
    tokens already hold top_p of the mass, the nucleus lies among them and a top-k replaces the full
    sort; otherwise the full sort decides. Then one uniform number per row picks a token through the
    cumulative sum of the kept probabilities, summed in float64 so that no token's share rounds away.
    """
    probs = scores.softmax(dim=-1)
    candidates = None
    if top_p < 1.0:
        k = min(TOP_P_CANDIDATES, probs.shape[-1])
        top_probs, top_idx = probs.topk(k, dim=-1)  # sorted, most likely first
        before = top_probs.cumsum(dim=-1) - top_probs  # mass of the more likely tokens
        if bool((before[:, -1] + top_probs[:, -1] >= top_p).all()):
            probs, candidates = top_probs.masked_fill(before >= top_p, 0.0), top_idx
        else:
            probs = probs.masked_fill(_outside_nucleus(scores, top_p), 0.0)
    cumulative = probs.double().cumsum(dim=-1)
    if uniform is None:
        uniform = torch.rand((probs.shape[0], 1), dtype=torch.float64)
    u = uniform * cumulative[:, -1:]
    picks = torch.searchsorted(cumulative, u, right=True).clamp_(max=probs.shape[-1] - 1)
    picks = picks if candidates is None else candidates.gather(1, picks)
    return picks.squeeze(1)


# --- attention for the static cache ---------------------------------------------------------------

STATIC_ATTENTION = "selfplay_static_sdpa"


def static_sdpa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """SDPA over the static cache with our ready boolean mask, registered as an HF attention function.

    transformers' `sdpa` path copies the whole key/value cache per layer and step (`repeat_kv`) for
    grouped-query attention whenever a mask is given (some versions), which for a static cache of
    length L at batch B moves B * heads * L * head_dim * 2 values per layer per step. For a single query
    token we instead fold the query heads of each key/value head into the query-length axis:
    query [B, kv_heads, group, D] against key/value [B, kv_heads, L, D] with the mask [B, 1, 1, L]
    broadcast, which is the same attention with no copy. The prefill (many query tokens) repeats the
    key/value heads once, as transformers does.
    """
    batch, heads, q_len, dim = query.shape
    kv_heads = key.shape[1]
    group = heads // kv_heads
    if q_len == 1 and group > 1:
        out = torch.nn.functional.scaled_dot_product_attention(
            query.reshape(batch, kv_heads, group, dim), key, value, attn_mask=attention_mask, scale=scaling
        )
        out = out.reshape(batch, heads, 1, value.shape[-1])
    else:
        if group > 1:
            key = key.repeat_interleave(group, dim=1)
            value = value.repeat_interleave(group, dim=1)
        out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def _register_attention() -> bool:
    try:
        from transformers import AttentionInterface

        AttentionInterface.register(STATIC_ATTENTION, static_sdpa_attention)
        return True
    except (ImportError, AttributeError):  # older transformers: keep the model's own sdpa
        return False


_HAVE_STATIC_ATTENTION = _register_attention()


@contextmanager
def _attention(model, name: str | None):
    """Run the model with attention implementation `name` (None: unchanged), restoring it afterwards."""
    if name is None:
        yield
        return
    old = model.config._attn_implementation
    model.config._attn_implementation = name
    try:
        yield
    finally:
        model.config._attn_implementation = old


# --- support checks -------------------------------------------------------------------------------


def _text_config(model):
    config = model.config
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def _sliding_window(config) -> int | None:
    """The attention window of every layer where a config sets one `sliding_window` and no `layer_types`
    (Mistral, Phi-3, Starcoder2; Qwen2-style configs only with use_sliding_window), else None. With
    `layer_types` a config says per layer which ones slide, and those are read from there."""
    if getattr(config, "layer_types", None):
        return None
    window = getattr(config, "sliding_window", None)
    return int(window) if window is not None and getattr(config, "use_sliding_window", True) else None


def unsupported_reason(model, length: int | None = None) -> str | None:
    """Why `static_generate` cannot run this model itself (None when it can). `length`: the most positions a
    row will hold (prompt plus new tokens, or plus a continuation scored on the prompt). A model with one
    sliding window for every layer runs here only where `length` fits in the window: there the window
    masks nothing and the layers attend to every earlier token, as the decode loop's full-attention cache
    does; longer, the window would drop the first tokens, and it goes to the hf backend."""
    config = model.config
    if getattr(config, "is_encoder_decoder", False):
        return "encoder-decoder models are not supported"
    impl = getattr(config, "_attn_implementation", None) or "eager"
    if impl not in ("sdpa", "eager"):
        return f"attention implementation {impl!r} (only sdpa and eager)"
    layer_types = getattr(_text_config(model), "layer_types", None) or []
    others = sorted({t for t in layer_types if t != "full_attention"})
    if others and models.logps.mask_window(model) is None:
        return f"layer types {others} (only full attention, or the sliding windows of {sorted(models.logps.MASK_MAPPING_MODEL_TYPES)})"
    window = _sliding_window(_text_config(model))
    if window is not None and (length is None or length > window):
        needs = "" if length is None else f", shorter than the {length} positions of prompt plus new tokens"
        return f"a sliding window of {window} tokens{needs}"
    return None


def _forward_params(model) -> set[str]:
    try:
        return set(inspect.signature(type(model).forward).parameters)
    except (TypeError, ValueError):
        return set()


# --- the decode session ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _SessionKey:
    batch: int
    cache_len: int
    max_new_tokens: int
    device: str
    dtype: str
    temperature: float
    top_p: float
    eos_ids: tuple
    pad_id: int
    graph: bool
    compiled: str  # torch.compile mode of the step, '' for none
    logps: bool  # also sum log pi(token) of the sampled tokens (untempered), row by row
    mixed: bool  # some rows greedy (the `greedy` buffer), the others sampled at `temperature`
    weights: int  # hash of parameter addresses (a replaced weight would leave a graph reading freed memory) and adapter state


def _weights_fingerprint(model) -> int:
    # Switching a LoRA adapter off or on (models.load.loading.root_weights) changes the computation without
    # moving a weight, so its state is part of the key: a graph captured the other way is never replayed.
    adapters_off = tuple(m.disable_adapters for m in model.modules() if hasattr(m, "lora_A"))
    return hash((tuple(p.data_ptr() for p in model.parameters()), adapters_off))


@dataclass
class _Session:
    """Static cache, static buffers and (on CUDA) the captured decode step for one batch shape."""

    key: _SessionKey
    model_ref: weakref.ref
    cache: object
    tokens: torch.Tensor  # [B, 1] last token of each row, input of the next step
    positions: torch.Tensor  # [B, 1] its position id
    cache_pos: torch.Tensor  # [1] its cache slot (same for every row: left padding)
    step_idx: torch.Tensor  # [1] column of `out` the step writes
    kv_valid: torch.Tensor  # [B, L] bool: key slot holds a real token
    done: torch.Tensor  # [B] bool: row has produced an eos
    out: torch.Tensor  # [B, max_new_tokens]
    logp_sum: torch.Tensor  # [B] float32: summed log-probs of the row's tokens so far (key.logps)
    greedy: torch.Tensor  # [B] bool: rows that take the argmax (key.mixed)
    eos: torch.Tensor  # [E]
    mask_dtype: torch.dtype | None  # None: boolean mask (sdpa); else additive mask of this dtype (eager)
    extra_kwargs: dict = field(default_factory=dict)
    attention: str | None = None  # attention implementation swapped in while this session runs the model
    graph: object = None
    step_fn: object = None
    stats: dict = field(default_factory=lambda: {"captures": 0, "reuses": 0, "compactions": 0})
    # Compaction (CPU): the step runs the first `active` slots; `slot_rows[i]` is the batch row slot i holds.
    active: int = 0
    slot_rows: torch.Tensor | None = None
    full_kv: list | None = None  # the cache's whole key/value tensors while its layers hold views of the first slots
    ended: tuple | None = None  # (tokens, log-probs) by batch row of the rows compaction moved out
    kv_pos: torch.Tensor | None = None  # [B, L] position of the token each key slot holds (sliding windows count positions)
    kept: tuple | None = None  # the last prefill's run of its prompts, kept to score continuations after decoding (prefill)

    # masks ------------------------------------------------------------------------------------
    def to_attention_mask(self, visible: torch.Tensor) -> torch.Tensor:
        if self.mask_dtype is None:
            return visible
        zero = torch.zeros((), dtype=self.mask_dtype, device=visible.device)
        return torch.where(visible, zero, torch.finfo(self.mask_dtype).min)

    def masks(self, model, visible: torch.Tensor, query_positions: torch.Tensor, key_positions: torch.Tensor):
        """`visible` as the model takes it: one mask, or one per layer type with sliding-window layers."""
        return models.logps.attention_masks(model, visible, query_positions, key_positions, self.to_attention_mask)

    def forward_logits(self, model, input_ids, mask, position_ids) -> torch.Tensor:
        out = model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=position_ids,
            cache=self.cache,
            use_cache=True,
            **self.extra_kwargs,
        )
        return out.logits[:, -1, :]

    # prefill ----------------------------------------------------------------------------------
    def next_tokens(self, logits: torch.Tensor) -> torch.Tensor:
        n = logits.shape[0]
        uniform = None
        if n < self.done.shape[0] and self.key.temperature > 0:
            # After compaction: the random numbers of every batch row are drawn as before, and each slot takes
            # its row's, so a row samples what it would have sampled in the whole batch.
            uniform = torch.rand((self.done.shape[0], 1), dtype=torch.float64)[self.slot_rows[:n]]
        picks = sample_next_tokens(logits, self.key.temperature, self.key.top_p, uniform)
        return torch.where(self.greedy[:n], logits.argmax(dim=-1), picks) if self.key.mixed else picks

    def prefill(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor, greedy_rows: torch.Tensor | None = None,
                continuations: list[list[list[int]]] | None = None, prefix: int = 0, keep: bool = False) -> list[list[float]] | None:
        """Reset the cache and buffers, run the prompts through the model, sample the first token.
        `continuations`: token-id lists per batch row to score as continuations of its prompt, from the
        prompt's run (cached_prompt_logps); their summed log-probs come back in the same shape.
        `prefix`: the first this many columns hold the same tokens in every row (_prefix_first), run once.
        `keep`: keep that run of the prompts for score_kept, to score continuations known only once decoded."""
        batch, width = input_ids.shape
        if greedy_rows is not None:
            self.greedy.copy_(greedy_rows)
        cache_len = self.kv_valid.shape[1]
        device = input_ids.device
        self.uncompact()
        self.cache.reset()
        prompt_valid = attention_mask.to(device=device, dtype=torch.bool)
        self.kv_valid.zero_()
        self.kv_valid[:, :width] = prompt_valid
        position_ids = (attention_mask.to(device=device, dtype=torch.long).cumsum(-1) - 1).clamp_(min=0)
        self.kv_pos[:, :width] = position_ids
        rows = torch.arange(width, device=device)[:, None]
        cols = torch.arange(cache_len, device=device)[None, :]
        visible = ((cols <= rows)[None, None] & self.kv_valid[:, None, None, :]) | (cols == rows)[None, None]
        extra = {k: v for k, v in self.extra_kwargs.items() if k != "cache_position"}
        if "cache_position" in self.extra_kwargs:
            extra["cache_position"] = torch.arange(width, device=device)
        unique_rows, row_of = _unique_prompts(input_ids, attention_mask)
        if unique_rows is None and (continuations is not None or prefix or keep):  # these need the prompts' own cache
            unique_rows = row_of = torch.arange(batch, device=device)
        scores = None
        if unique_rows is None:
            logits = model(
                input_ids=input_ids,
                attention_mask=self.masks(model, visible, position_ids, self.kv_pos),
                position_ids=position_ids,
                cache=self.cache,
                use_cache=True,
                **extra,
            ).logits[:, -1, :]
        else:
            logits, scores = self.shared_prefill(model, input_ids, attention_mask, visible, position_ids, extra, unique_rows, row_of,
                                                 continuations, prefix, keep)
        first = self.next_tokens(logits)
        self.logp_sum.copy_(_token_logps(logits, first) if self.key.logps else 0.0)
        self.tokens.copy_(first[:, None])
        self.positions.copy_(position_ids[:, -1:] + 1)
        self.cache_pos.fill_(width)
        self.step_idx.fill_(1)
        self.out.fill_(self.key.pad_id)
        self.out[:, 0] = first
        self.done.copy_(torch.isin(first, self.eos))
        return scores

    def shared_prefill(self, model, input_ids, attention_mask, visible, position_ids, extra, unique_rows, row_of,
                       continuations=None, prefix: int = 0, keep: bool = False) -> tuple[torch.Tensor, list[list[float]] | None]:
        """The prefill of a batch whose rows repeat prompts (K samples of each): each distinct prompt runs
        once into a dynamic cache, whose keys and values are then written into every row of the static
        cache that holds that prompt. Same keys, values and last logits per row as the full prefill, for
        1/K of its FLOPs. With `prefix` (columns every row shares, such as a chat template's system turn),
        those run once for all prompts and the prompts continue from their keys and values. Returns the
        last position's logits, one row per batch row, and the summed log-probs of `continuations` (see
        prefill), scored on the same dynamic cache."""
        from transformers import DynamicCache

        width = input_ids.shape[1]
        # Sliding-window layers keep every key here too (the masks apply the window): their own cache would keep
        # the last window's slots, and the static cache's rows are filled from these.
        prompt_cache = DynamicCache() if models.logps.mask_window(model) is not None else DynamicCache(config=model.config)

        def run(rows, start: int, end: int) -> torch.Tensor:
            part = dict(extra)
            if "cache_position" in extra:  # older transformers: where the columns go in the cache
                part["cache_position"] = torch.arange(start, end, device=input_ids.device)
            return model(
                input_ids=input_ids[rows, start:end],
                attention_mask=self.masks(model, visible[rows, :, start:end, :end], position_ids[rows, start:end], self.kv_pos[rows, :end]),
                position_ids=position_ids[rows, start:end],
                cache=prompt_cache,
                use_cache=True,
                **part,
            ).logits[:, -1, :]

        if prefix:
            run(unique_rows[:1], 0, prefix)
            prompt_cache.batch_repeat_interleave(unique_rows.shape[0])
        logits = run(unique_rows, prefix, width)
        # Older transformers write a static cache at `cache_position`; newer ones at its own offset.
        cache_kwargs = {"cache_position": extra["cache_position"]} if "cache_position" in extra else None
        for layer_idx, layer in enumerate(prompt_cache.layers):
            self.cache.update(layer.keys[row_of], layer.values[row_of], layer_idx, cache_kwargs)
        if keep:  # a copy: scoring appends the continuations' keys to the cache it is given
            self.kept = (copy.deepcopy(prompt_cache), attention_mask[unique_rows], logits, row_of)
        if continuations is None:
            return logits[row_of], None
        return logits[row_of], self._score(model, (prompt_cache, attention_mask[unique_rows], logits, row_of), continuations)

    def _score(self, model, prompts_run: tuple, continuations: list[list[list[int]]]) -> list[list[float]]:
        """Summed log-probs of `continuations` (token-id lists per batch row) on a run of the rows' prompts
        (prompt cache, prompt mask, last logits, batch row -> prompt), in the same shape (cached_prompt_logps)."""
        prompt_cache, prompt_mask, logits, row_of = prompts_run
        owners = [row for row, items in enumerate(continuations) for _ in items]
        flat = models.logps.cached_prompt_logps(model, prompt_cache, prompt_mask, logits, row_of[owners].tolist(),
                                                [ids for items in continuations for ids in items], self.to_attention_mask)
        scores, start = [], 0
        for items in continuations:
            scores.append(flat[start : start + len(items)])
            start += len(items)
        return scores

    def score_kept(self, model, continuations: list[list[list[int]]]) -> list[list[float]] | None:
        """`continuations` scored on the prompts' run the last prefill kept (`keep`), as prefill scores its own;
        None where a continuation is too long for the model's sliding window (unsupported_reason's limit)."""
        kept, self.kept = self.kept, None
        longest = max((len(ids) for items in continuations for ids in items), default=0)
        window = _sliding_window(_text_config(model))
        if window is not None and kept[1].shape[1] + longest > window:
            return None
        return self._score(model, kept, continuations)

    # one decode step (captured on CUDA) ---------------------------------------------------------
    def step(self) -> None:
        model = self.model_ref()
        n = self.active  # the whole batch, unless compaction left fewer rows (views of the first slots)
        kv_valid, done, tokens, positions = self.kv_valid[:n], self.done[:n], self.tokens[:n], self.positions[:n]
        kv_valid.index_fill_(1, self.cache_pos, True)
        self.kv_pos[:n].index_copy_(1, self.cache_pos, positions)
        visible = kv_valid[:, None, None, :]
        if "cache_position" in self.extra_kwargs:
            self.extra_kwargs["cache_position"] = self.cache_pos
        logits = self.forward_logits(model, tokens, self.masks(model, visible, positions, self.kv_pos[:n]), positions)
        nxt = self.next_tokens(logits)
        if self.key.logps:  # rows that ended before this step add nothing; the step that samples the eos does
            self.logp_sum[:n].add_(torch.where(done, 0.0, _token_logps(logits, nxt)))
        nxt = torch.where(done, self.key.pad_id, nxt)
        self.out[:n].index_copy_(1, self.step_idx, nxt[:, None])
        done.logical_or_(torch.isin(nxt, self.eos))
        tokens.copy_(nxt[:, None])
        positions.add_(1)
        self.cache_pos.add_(1)
        self.step_idx.add_(1)

    # compaction (CPU) ---------------------------------------------------------------------------
    def compact(self) -> None:
        """Move the rows still decoding to the first slots, in order, and run the next steps on them alone.

        Why: a CPU step costs about in proportion to its rows (SmolLM2 fp32: 28 ms for one row, 71 ms for
        32), and rows that ended keep costing until the longest row ends; Evaluate's greedy answers end
        after half the token budget or less. The ended rows' tokens and log-probs are kept by batch row; the
        live rows' keys and values move to the first slots of the same cache tensors (one copy of theirs),
        and the cache's layers hold views of those slots. Packed weights compute each row alone
        (models/packing.py) and every row keeps its random numbers (next_tokens), so the tokens are the whole
        batch's up to the rounding of the CPU attention kernel, which splits its work by batch size (SmolLM2:
        64 of 64 rows equal, summed log-probs within 4e-5).
        """
        n = self.active
        done = self.done[:n]
        if self.ended is None:  # slots are still batch rows
            self.ended = (self.out.clone(), self.logp_sum.clone())
        else:
            gone = done.nonzero().squeeze(1)
            rows = self.slot_rows[gone]
            self.ended[0][rows] = self.out[gone]
            self.ended[1][rows] = self.logp_sum[gone]
        live = (~done).nonzero().squeeze(1)
        k = live.numel()
        for buffer in (self.tokens, self.positions, self.kv_valid, self.kv_pos, self.done, self.out, self.logp_sum, self.greedy,
                       self.slot_rows):
            buffer[:k] = buffer[live]
        if self.full_kv is None:
            self.full_kv = [(layer.keys, layer.values) for layer in self.cache.layers]
        for layer, (keys, values) in zip(self.cache.layers, self.full_kv):
            keys[:k] = keys[live]
            values[:k] = values[live]
            layer.keys, layer.values = keys[:k], values[:k]
        self.active = k
        self.stats["compactions"] += 1

    def uncompact(self) -> None:
        """Give the cache's layers their whole tensors back and every slot its own batch row (a new prefill)."""
        if self.full_kv is not None:
            for layer, (keys, values) in zip(self.cache.layers, self.full_kv):
                layer.keys, layer.values = keys, values
            self.full_kv = None
        batch = self.done.shape[0]
        self.active = batch
        self.slot_rows = torch.arange(batch, device=self.done.device)
        self.ended = None

    def results(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(new tokens, summed log-probs), one row per batch row in the batch's order."""
        if self.ended is None:
            return self.out.clone(), self.logp_sum.clone()
        tokens, logps = self.ended
        rows = self.slot_rows[: self.active]
        tokens[rows] = self.out[: self.active]
        logps[rows] = self.logp_sum[: self.active]
        return tokens, logps

    def capture(self, warmup: int = 2) -> None:
        """Warm the step up on a side stream, then capture it; buffers are restored after warm-up."""
        saved = [t.clone() for t in (self.tokens, self.positions, self.cache_pos, self.step_idx, self.kv_valid, self.done, self.out, self.logp_sum,
                                     self.kv_pos)]
        lengths = _cache_lengths(self.cache)
        step = self.step_fn or self.step
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                step()
        torch.cuda.current_stream().wait_stream(stream)
        self._restore(saved, lengths)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        self._restore(saved, lengths)  # capture runs nothing, but keep the state exact regardless
        self.graph = graph
        self.stats["captures"] += 1

    def _restore(self, saved, lengths) -> None:
        for dst, src in zip((self.tokens, self.positions, self.cache_pos, self.step_idx, self.kv_valid, self.done, self.out, self.logp_sum,
                             self.kv_pos), saved):
            dst.copy_(src)
        _set_cache_lengths(self.cache, lengths)

    def decode(self, max_new_tokens: int, check_every: int, compact: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode up to `max_new_tokens`; `compact`: drop ended rows from the step once a quarter of those it
        runs have ended (eager steps only: a graph or a compiled step has a fixed batch). Returns results()."""
        step = self.step_fn or self.step
        for t in range(1, max_new_tokens):
            if self.graph is not None:
                self.graph.replay()
            else:
                step()
            if compact:
                ended = int(self.done[: self.active].sum())
                if ended == self.active:
                    break
                if t < max_new_tokens - 1 and ended >= max(1, self.active // 4):
                    self.compact()
            elif check_every and (t % check_every == 0 or t == 1) and bool(self.done.all()):
                break
        return self.results()


def _prefix_first(input_ids: torch.Tensor, attention_mask: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Left-padded prompts laid out as [the prefix every prompt shares | padding | each prompt's rest], and
    the prefix's length (0, and the batch as it was, when it is shorter than models.logps.SHARED_PREFIX_MIN or the rows
    are one prompt repeated).

    Chat templates start every prompt with the same tokens (SmolLM2's system turn is 23 of its ~40 prompt
    tokens on the demo's tasks), and with those in the first columns of every row the prefill runs them
    once (_Session.shared_prefill). Each token keeps its position (positions count real tokens) and sees
    the same keys, so the model computes what it computes on the left-padded batch; every row keeps at
    least its last prompt token after the prefix, in the last column, where decoding continues."""
    rows = [ids[mask.bool()].tolist() for ids, mask in zip(input_ids, attention_mask)]
    first, shortest = rows[0], min(len(row) for row in rows)
    prefix = 0
    while prefix < shortest - 1 and all(row[prefix] == first[prefix] for row in rows):
        prefix += 1
    if prefix < models.logps.SHARED_PREFIX_MIN or all(row == first for row in rows):
        return input_ids, attention_mask, 0
    width = input_ids.shape[1]
    laid_out = torch.full_like(input_ids, pad_id)
    mask = torch.zeros_like(attention_mask)
    laid_out[:, :prefix] = torch.tensor(first[:prefix], dtype=input_ids.dtype)
    mask[:, :prefix] = 1
    for n, row in enumerate(rows):
        rest = len(row) - prefix
        laid_out[n, width - rest :] = torch.tensor(row[prefix:], dtype=input_ids.dtype)
        mask[n, width - rest :] = 1
    return laid_out, mask, prefix


def _unique_prompts(input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """(rows to run, index of each batch row among them) when some rows repeat a prompt, else (None, None).

    Rows count as the same prompt when their ids and padding are equal, as the K samples of a prompt are
    (models.generate.generation.generate_texts keeps them adjacent in a batch)."""
    keys = torch.cat([input_ids, attention_mask.to(input_ids.dtype)], dim=1)
    unique, row_of = torch.unique(keys, dim=0, return_inverse=True)
    if unique.shape[0] == keys.shape[0]:
        return None, None
    first_row = torch.full((unique.shape[0],), keys.shape[0], dtype=torch.long, device=keys.device)
    first_row.scatter_reduce_(0, row_of, torch.arange(keys.shape[0], device=keys.device), reduce="amin")
    first_row, order = first_row.sort()  # distinct prompts in batch order
    return first_row, order.argsort()[row_of]


def _cache_lengths(cache) -> list:
    layers = getattr(cache, "layers", [])
    return [layer.cumulative_length.clone() if isinstance(getattr(layer, "cumulative_length", None), torch.Tensor) else None for layer in layers]


def _set_cache_lengths(cache, lengths) -> None:
    for layer, value in zip(getattr(cache, "layers", []), lengths):
        if value is not None:
            layer.cumulative_length.copy_(value)


_SESSIONS: "weakref.WeakKeyDictionary[torch.nn.Module, _Session]" = weakref.WeakKeyDictionary()


def release_sessions(model=None) -> None:
    """Free the static caches, graphs and packed CPU weights kept for `model` (all models when None)."""
    if model is None:
        _SESSIONS.clear()
    else:
        _SESSIONS.pop(model, None)
    release_packed(model)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _compile_mode(compile_step) -> str:
    if compile_step is None:
        compile_step = os.environ.get("SELFPLAY_STATIC_COMPILE", "0").strip()
        compile_step = True if compile_step.lower() in ("1", "true", "yes", "on") else compile_step
        compile_step = False if compile_step.lower() in ("0", "false", "no", "off", "") else compile_step
    if compile_step is True:
        return "default"
    return compile_step or ""


def _all_full_attention(model):
    """The model's config, or for sliding-window layers (models.logps.mask_window) a copy whose layers all
    attend fully: the static cache then keeps every key of every layer in its slot, and the masks apply the
    window on positions. (transformers' sliding layers keep a rolling window of slots of their own, which
    neither the masks nor compaction could address.)"""
    if models.logps.mask_window(model) is None:
        return model.config
    import copy

    config = copy.copy(_text_config(model))
    config.layer_types = ["full_attention"] * len(config.layer_types)
    config.sliding_window = None
    return config


def _new_session(model, key: _SessionKey, device: torch.device) -> _Session:
    from transformers import StaticCache

    batch, cache_len = key.batch, key.cache_len
    impl = getattr(model.config, "_attn_implementation", None) or "eager"
    params = _forward_params(model)
    extra = {}
    if "logits_to_keep" in params:
        extra["logits_to_keep"] = 1
    elif "num_logits_to_keep" in params:
        extra["num_logits_to_keep"] = 1
    if "cache_position" in params:  # older transformers: the static cache writes at cache_position
        extra["cache_position"] = None
    long = dict(dtype=torch.long, device=device)
    session = _Session(
        key=key,
        model_ref=weakref.ref(model),
        cache=StaticCache(config=_all_full_attention(model), max_cache_len=cache_len),
        tokens=torch.zeros((batch, 1), **long),
        positions=torch.zeros((batch, 1), **long),
        cache_pos=torch.zeros((1,), **long),
        step_idx=torch.ones((1,), **long),
        kv_valid=torch.zeros((batch, cache_len), dtype=torch.bool, device=device),
        kv_pos=torch.zeros((batch, cache_len), **long),
        done=torch.zeros((batch,), dtype=torch.bool, device=device),
        out=torch.zeros((batch, key.max_new_tokens), **long),
        logp_sum=torch.zeros((batch,), dtype=torch.float32, device=device),
        greedy=torch.zeros((batch,), dtype=torch.bool, device=device),
        eos=torch.tensor(list(key.eos_ids), **long),
        mask_dtype=None if impl == "sdpa" else next(model.parameters()).dtype,
        extra_kwargs=extra,
        attention=STATIC_ATTENTION if impl == "sdpa" and _HAVE_STATIC_ATTENTION and _env_flag("SELFPLAY_STATIC_ATTENTION", True) else None,
    )
    if key.compiled:
        session.step_fn = torch.compile(session.step, mode=key.compiled, dynamic=False)
    return session


# --- the backend ----------------------------------------------------------------------------------


class StaticGeneration(NamedTuple):
    """What static_generate returns, whatever it was asked for."""

    tokens: torch.Tensor  # [batch, max_new_tokens] new tokens; a row is padded after its eos
    logps: torch.Tensor | None  # [batch] summed log-prob of each row's tokens, its eos included (settings.logps), else None
    scores: list[list[float]] | None  # summed log-probs of `continuations`, per row; None when none were asked or scored
    later_scores: list[list[float]] | None = None  # the same of what `later` asked for after decoding


@torch.no_grad()
def static_generate(
    model,
    tokenizer,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    settings: SamplingSettings,
    eos_ids: list[int],
    *,
    cuda_graph: bool | None = None,
    compile_step: bool | str | None = None,
    check_every: int | None = None,
    greedy_rows: torch.Tensor | None = None,
    continuations: list[list[list[int]]] | None = None,
    later=None,
):
    """New tokens `[batch, settings.max_new_tokens]` for left-padded prompts, as a StaticGeneration; rows padded
    after their eos. With `settings.logps`, also each row's summed log-prob of its tokens (`[batch]`, the eos included).
    `greedy_rows` (`[batch]` bool): those rows take the argmax while the others sample with `settings`,
    in one decoding (a prompt's greedy answer and its samples then share its prefill too).
    `continuations` (token-id lists per row): scored as continuations of the row's prompt from the prefill's
    own run of it (`_Session.prefill`); their `scores` per row in the same shape, or None where this backend
    could not run the model (the caller scores them). `later(tokens, logps)`: continuations per row that depend
    on what was decoded (Evaluate's round-0 held-out pairs hold the base's sample), scored after decoding on the
    same run of the prompts, into `later_scores` (None where not scored: the caller scores them).

    `cuda_graph` (default: on for CUDA inputs unless SELFPLAY_STATIC_CUDA_GRAPH=0) captures the decode
    step in a CUDA graph; `compile_step` (True, or a torch.compile mode; default from
    SELFPLAY_STATIC_COMPILE: unset/0 off, 1 "default", else a mode name) compiles it first;
    `check_every` steps the loop checks whether every row has ended (default 16 on CUDA, 1 on CPU).
    Seed with torch.manual_seed beforehand for reproducible sampling.
    """
    batch, width = input_ids.shape
    max_new = int(settings.max_new_tokens)
    device = input_ids.device
    longest_scored = max((len(ids) for items in continuations or [] for ids in items), default=0)
    reason = "no new tokens" if max_new <= 0 else unsupported_reason(model, width + max(max_new, longest_scored))
    if reason is not None:
        return _without_session(reason, model, tokenizer, input_ids, attention_mask, settings, eos_ids, greedy_rows)
    on_cuda = device.type == "cuda"
    use_graph = on_cuda and (cuda_graph if cuda_graph is not None else _env_flag("SELFPLAY_STATIC_CUDA_GRAPH", True))
    compiled = _compile_mode(compile_step)
    check_every = check_every if check_every is not None else (16 if on_cuda else 1)
    key = _session_key(model, tokenizer, input_ids, settings, eos_ids, use_graph, compiled, greedy_rows)
    session, fresh = _session_for(model, key, device)
    input_ids, attention_mask, prefix = _prefix_first(input_ids.to(torch.long), attention_mask, key.pad_id)
    packing = packed_linears(model, batch) if device.type == "cpu" else nullcontext()
    with _attention(model, session.attention), packing:
        return _run(session, model, input_ids, attention_mask, fresh, use_graph, compiled, device, max_new, check_every,
                    greedy_rows.to(device) if key.mixed else None, continuations, prefix, later)


def _without_session(reason: str, model, tokenizer, input_ids, attention_mask, settings, eos_ids, greedy_rows) -> StaticGeneration:
    """What static_generate returns where its loop cannot run: nothing for no new tokens, else transformers' generate."""
    batch, device = input_ids.shape[0], input_ids.device
    if settings.max_new_tokens <= 0:
        empty = torch.empty((batch, 0), dtype=torch.long, device=device)
        return StaticGeneration(empty, torch.zeros(batch, device=device) if settings.logps else None, None)
    from models.generate.sampling import hf_generate

    log.warning("static generation: %s; using the hf backend", reason)
    out = hf_generate(model, tokenizer, input_ids, attention_mask, settings, eos_ids, greedy_rows)
    return StaticGeneration(*(out if settings.logps else (out, None)), None)


def _session_key(model, tokenizer, input_ids, settings, eos_ids, use_graph: bool, compiled: str, greedy_rows) -> _SessionKey:
    """What a session's buffers (and captured graph) depend on: a call with the same key reuses the session."""
    batch, width = input_ids.shape
    max_new, device = int(settings.max_new_tokens), input_ids.device
    pad_id = tokenizer.pad_token_id if tokenizer is not None and tokenizer.pad_token_id is not None else (eos_ids[0] if eos_ids else 0)
    cache_len = width + max_new
    if device.type == "cuda":
        cache_len = -(-cache_len // CUDA_CACHE_ROUND) * CUDA_CACHE_ROUND
        window = _sliding_window(_text_config(model))
        if window is not None:  # rounded up, the cache must stay within a window the rows fit in
            cache_len = min(cache_len, window)
    temperature = float(settings.temperature) if settings.temperature and settings.temperature > 0 else 0.0
    return _SessionKey(
        batch=batch,
        cache_len=cache_len,
        max_new_tokens=max_new,
        device=str(device),
        dtype=str(next(model.parameters()).dtype),
        temperature=temperature,
        top_p=float(settings.top_p) if temperature > 0 else 1.0,
        eos_ids=tuple(int(i) for i in eos_ids),
        pad_id=int(pad_id),
        graph=use_graph,
        compiled=compiled,
        logps=bool(settings.logps),
        mixed=greedy_rows is not None and temperature > 0 and bool(greedy_rows.any()),
        weights=_weights_fingerprint(model),
    )


def _session_for(model, key: _SessionKey, device: torch.device) -> tuple[_Session, bool]:
    """The model's session for `key`: the cached one, or a new one (the old cache dropped first); and whether it is new."""
    session = _SESSIONS.get(model)
    if session is not None and session.key == key:
        session.stats["reuses"] += 1
        return session, False
    _SESSIONS.pop(model, None)
    session = None  # drop the old cache before allocating the new one
    if device.type == "cuda":
        torch.cuda.empty_cache()
    session = _SESSIONS[model] = _new_session(model, key, device)
    return session, True


def _run(session, model, input_ids, attention_mask, fresh, use_graph, compiled, device, max_new, check_every, greedy_rows,
         continuations=None, prefix=0, later=None) -> StaticGeneration:
    on_cuda = device.type == "cuda"
    if fresh and (use_graph or compiled):
        # The first prefill allocates the cache; then warm up (and compile) and capture the step. The
        # random streams are restored afterwards, so samples do not depend on whether a session was reused.
        with torch.random.fork_rng(devices=[device] if on_cuda else []):
            session.prefill(model, input_ids, attention_mask, greedy_rows)
            if use_graph:
                try:
                    session.capture()
                except Exception as exc:  # noqa: BLE001 - any capture failure: decode eagerly instead
                    log.warning("static generation: CUDA graph capture failed (%s); decoding without a graph", str(exc).splitlines()[0])
                    session.graph = None
                    torch.cuda.synchronize()
            elif compiled:
                session.step_fn()  # compile now; the prefill below resets the state
    scores = session.prefill(model, input_ids, attention_mask, greedy_rows, continuations, prefix, keep=later is not None)
    compact = not on_cuda and not compiled and _env_flag(COMPACT_ENV, True)
    tokens, logps = session.decode(max_new, check_every, compact)
    logps = logps if session.key.logps else None
    later_scores = session.score_kept(model, later(tokens, logps)) if later is not None else None
    return StaticGeneration(tokens, logps, scores, later_scores)
