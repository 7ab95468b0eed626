"""models/generate/fast_generation.py: the static-cache decode loop against transformers' generate.

CPU tests use tiny random fp32 models (Llama and Qwen2, sdpa and eager attention) and run in seconds.
GPU tests (`-m gpu`, skipped without CUDA) repeat the comparison with the decode step captured in a
CUDA graph, check sampling there, and compare greedy outputs of a briefly trained model in bf16.
"""

from __future__ import annotations

import pytest
import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from models.generate.fast_generation import (
    _SESSIONS,
    release_sessions,
    sample_next_tokens,
    static_generate,
    static_sdpa_attention,
    unsupported_reason,
)
from models.generate.generation import generate_texts
from models.packing import cpu_packing_available, packed_linears
from models.generate.sampling import SamplingSettings

VOCAB = 101
PAD = 0
CUDA = torch.cuda.is_available()


class _Tok:
    """All static_generate needs of a tokenizer."""

    pad_token_id = PAD


def tiny_model(family: str, attn: str = "sdpa", vocab: int = VOCAB, layers: int = 2, seed: int = 0, init_std: float = 0.02):
    torch.manual_seed(seed)
    common = dict(
        initializer_range=init_std,
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    if family == "llama":
        model = LlamaForCausalLM._from_config(LlamaConfig(**common), attn_implementation=attn)
    else:
        model = Qwen2ForCausalLM._from_config(Qwen2Config(**common, tie_word_embeddings=True), attn_implementation=attn)
    model.generation_config.eos_token_id = None  # Llama's config says 2; stop only where a test says
    return model.eval()


def left_padded(lengths: list[int], vocab: int = VOCAB, seed: int = 1, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    input_ids = torch.full((len(lengths), width), PAD, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, length in enumerate(lengths):
        input_ids[row, width - length :] = torch.randint(3, vocab, (length,), generator=gen)
        attention_mask[row, width - length :] = 1
    return input_ids.to(device), attention_mask.to(device)


def hf_greedy(model, input_ids, attention_mask, max_new: int, eos_ids: list[int]):
    config = GenerationConfig(max_new_tokens=max_new, do_sample=False, pad_token_id=PAD, eos_token_id=eos_ids or None)
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
    return out[:, input_ids.shape[1] :]


def until_eos(row: list[int], eos_ids: list[int]) -> list[int]:
    for i, tok in enumerate(row):
        if tok in eos_ids:
            return row[: i + 1]
    return row


def assert_same_greedy(ours: torch.Tensor, ref: torch.Tensor, eos_ids: list[int]) -> None:
    for r, (a, b) in enumerate(zip(ours.tolist(), ref.tolist())):
        a, b = until_eos(a, eos_ids), until_eos(b, eos_ids)
        assert a == b, f"row {r}: static {a} != hf {b}"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matrices: one CPU thread is several times faster than many, more so on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _fresh_sessions():
    release_sessions()
    yield
    release_sessions()


@pytest.fixture(autouse=True)
def _pack_every_weight(monkeypatch):
    """The tiny models' weights lie below the size that pays to pack; pack them anyway, so every CPU test of
    the static backend here runs the packed kernels (the greedy comparisons with generate included)."""
    import models.packing as packing

    monkeypatch.setattr(packing, "PACK_MIN_WEIGHTS", 0)


# --- CPU ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_greedy_matches_hf_generate(family, attn):
    model = tiny_model(family, attn)
    input_ids, attention_mask = left_padded([3, 11, 6, 1, 8])
    free = hf_greedy(model, input_ids, attention_mask, 24, [])
    # An eos the model really emits, so rows stop at different steps.
    eos = [free[0, 5].item()]
    ref = hf_greedy(model, input_ids, attention_mask, 24, eos)
    settings = SamplingSettings(temperature=0, max_new_tokens=24)
    ours = static_generate(model, _Tok, input_ids, attention_mask, settings, eos).tokens
    assert ours.shape == (5, 24)
    assert_same_greedy(ours, ref, eos)
    for row in ours.tolist():  # finished rows are padded after their eos
        cut = len(until_eos(row, eos))
        assert all(tok == PAD for tok in row[cut:])
    assert_same_greedy(static_generate(model, _Tok, input_ids, attention_mask, settings, []).tokens, free, [])


def test_generate_texts_static_equals_hf_backend():
    from models.load.tokenizer import build_byte_tokenizer

    tokenizer = build_byte_tokenizer()
    model = tiny_model("llama", vocab=len(tokenizer))
    prompts = ["a", "hello there", "12+34=", "reverse: abcdef", "xyz", "the quick brown fox"]
    outs = {}
    for backend in ("hf", "static"):
        settings = SamplingSettings(num_samples=2, temperature=0, max_new_tokens=12, batch_size=4, backend=backend)
        outs[backend] = generate_texts(model, tokenizer, prompts, settings)
    assert outs["static"] == outs["hf"]
    assert any(s.text for samples in outs["static"] for s in samples)


@pytest.mark.parametrize("backend", ["hf", "static"])
@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_log_probs_summed_while_generating_equal_a_forward_pass(backend, temperature):
    """Evaluate takes each answer's policy log-prob from its generation (SamplingSettings.logps): the
    untempered log-prob of exactly the sampled ids, the eos included and nothing after it, as
    models.logps scores the prompt and those ids in one forward."""
    from models.logps import Encoded, collate, sequence_logps
    from models.load.tokenizer import build_byte_tokenizer

    tokenizer = build_byte_tokenizer()
    model = tiny_model("llama", vocab=len(tokenizer), init_std=0.3)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    prompts = ["a", "hello there", "12+34=", "reverse: abcdef", "the quick brown fox"]
    settings = SamplingSettings(num_samples=2, temperature=temperature, top_p=0.9, max_new_tokens=48, batch_size=4,
                                backend=backend, logps=True)
    torch.manual_seed(0)
    samples = generate_texts(model, tokenizer, prompts, settings)
    rows = [(p, s) for p, group in zip(prompts, samples) for s in group]
    assert any(s.finished for _p, s in rows)  # some rows end at the eos, before the others
    for prompt, sample in rows:
        item = Encoded(tokenizer(prompt, add_special_tokens=False).input_ids, sample.token_ids)
        expected = sequence_logps(model, collate([item], tokenizer.pad_token_id))[0].item()
        assert sample.logp == pytest.approx(expected, abs=1e-4), (prompt, sample.text)


@pytest.mark.parametrize("backend", ["hf", "static"])
def test_greedy_answers_decoded_beside_samples_are_the_greedy_answers(backend, monkeypatch):
    """Evaluate decodes each prompt's greedy answer in the same batch as its samples (greedy_samples): those
    rows are exactly what a greedy-only run gives, the other rows sample, and on the static backend each
    prompt is prefilled once for all its rows."""
    from models.load.tokenizer import build_byte_tokenizer

    tokenizer = build_byte_tokenizer()
    model = tiny_model("llama", vocab=len(tokenizer), init_std=0.3)
    prompts = ["a", "hello there", "12+34=", "reverse: abcdef"]
    greedy = generate_texts(model, tokenizer, prompts, SamplingSettings(temperature=0, max_new_tokens=12, batch_size=12,
                                                                        backend=backend))
    forward_rows = count_forward_rows(model, monkeypatch)
    mixed = generate_texts(model, tokenizer, prompts, SamplingSettings(num_samples=3, greedy_samples=1, temperature=1.0,
                                                                       max_new_tokens=12, batch_size=12, backend=backend))
    assert [m[0] for m in mixed] == [g[0] for g in greedy]
    assert any(s.token_ids != m[0].token_ids for m in mixed for s in m[1:])  # the others are samples
    if backend == "static":
        assert forward_rows[0] == len(prompts) and set(forward_rows[1:]) == {3 * len(prompts)}


def repeated_prompts(lengths: list[int], copies: int):
    """Each prompt `copies` times in a row, as generate_texts batches the K samples of a prompt."""
    input_ids, attention_mask = left_padded(lengths)
    return input_ids.repeat_interleave(copies, dim=0), attention_mask.repeat_interleave(copies, dim=0)


def count_forward_rows(model, monkeypatch) -> list[int]:
    """The batch size of every forward call the model makes from now on."""
    rows, forward = [], model.forward
    monkeypatch.setattr(model, "forward", lambda *a, **kw: rows.append(kw["input_ids"].shape[0]) or forward(*a, **kw))
    return rows


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_repeated_prompts_prefill_once_with_the_same_greedy_tokens(attn, monkeypatch):
    from models.generate.fast_generation import _unique_prompts

    model = tiny_model("qwen2", attn, init_std=0.3)  # sharp attention: a wrong prompt cache changes the tokens
    input_ids, attention_mask = repeated_prompts([3, 9, 6], copies=3)
    rows, row_of = _unique_prompts(input_ids, attention_mask)
    assert rows.tolist() == [0, 3, 6] and row_of.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    ref = hf_greedy(model, input_ids, attention_mask, 16, [])
    forward_rows = count_forward_rows(model, monkeypatch)
    ours = static_generate(model, _Tok, input_ids, attention_mask, SamplingSettings(temperature=0, max_new_tokens=16), []).tokens
    assert forward_rows[0] == 3 and set(forward_rows[1:]) == {9}  # prefill of 3 prompts, then 9-row steps
    assert_same_greedy(ours, ref, [])


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_a_prefix_every_prompt_shares_runs_once_with_the_same_tokens(attn, monkeypatch):
    """Prompts that start alike (a chat template's system turn) are prefilled as that prefix once, then each
    prompt's rest on its keys and values: greedy tokens equal generate's on the left-padded batch, and the
    log-probs summed while decoding equal those of a whole-batch prefill."""
    import models.logps

    model = tiny_model("llama", attn, init_std=0.3)
    gen = torch.Generator().manual_seed(4)
    prefix = torch.randint(3, VOCAB, (7,), generator=gen).tolist()
    prompts = [prefix + torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in (1, 5, 3, 9)]
    rows = [p for p in prompts for _ in range(2)]  # two rows a prompt, as K samples are
    width = max(map(len, rows))
    input_ids = torch.tensor([[PAD] * (width - len(r)) + r for r in rows])
    attention_mask = (torch.arange(width)[None] >= torch.tensor([width - len(r) for r in rows])[:, None]).long()
    ref = hf_greedy(model, input_ids, attention_mask, 12, [])
    forward_shapes = []
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda *a, **kw: forward_shapes.append(tuple(kw["input_ids"].shape)) or forward(*a, **kw))
    settings = SamplingSettings(temperature=0, max_new_tokens=12, logps=True)
    tokens, logps = static_generate(model, _Tok, input_ids, attention_mask, settings, [])[:2]
    assert forward_shapes[:2] == [(1, 7), (4, width - 7)]  # the prefix once, then the 4 prompts' rests
    assert_same_greedy(tokens, ref, [])
    release_sessions()
    monkeypatch.setattr(models.logps, "SHARED_PREFIX_MIN", 10**6)  # no prefix run apart
    plain_tokens, plain_logps = static_generate(model, _Tok, input_ids, attention_mask, settings, [])[:2]
    assert torch.equal(tokens, plain_tokens)
    torch.testing.assert_close(logps, plain_logps, rtol=0, atol=1e-5)


def test_shared_prefill_samples_what_the_full_prefill_samples(monkeypatch):
    import models.generate.fast_generation as fast

    model = tiny_model("llama", init_std=0.3)
    input_ids, attention_mask = repeated_prompts([4, 10], copies=4)
    settings = SamplingSettings(temperature=1.0, top_p=0.95, max_new_tokens=16)
    forward_rows = count_forward_rows(model, monkeypatch)
    torch.manual_seed(5)
    shared = static_generate(model, _Tok, input_ids, attention_mask, settings, []).tokens
    assert forward_rows[0] == 2  # the prefill ran two distinct prompts, not eight rows
    assert len({tuple(row) for row in shared.tolist()}) > 2  # the copies still sample apart
    release_sessions()
    monkeypatch.setattr(fast, "_unique_prompts", lambda ids, mask: (None, None))
    torch.manual_seed(5)
    assert torch.equal(static_generate(model, _Tok, input_ids, attention_mask, settings, []).tokens, shared)


needs_packing = pytest.mark.skipif(not cpu_packing_available(), reason="this torch build has no oneDNN linear")


def linear_modules(model) -> list:
    return [m for m in model.modules() if type(m) is torch.nn.Linear]


@needs_packing
def test_packed_linears_compute_the_same_logits_and_restore_the_model():
    model = tiny_model("llama")
    input_ids, attention_mask = left_padded([5, 9, 2])
    with torch.no_grad():
        plain = model(input_ids=input_ids, attention_mask=attention_mask).logits
        with packed_linears(model, batch_hint=3) as active:
            assert all("forward" in m.__dict__ for m in linear_modules(model))  # every Linear, the LM head too
            packed = model(input_ids=input_ids, attention_mask=attention_mask).logits
    assert active
    torch.testing.assert_close(packed, plain, rtol=1e-5, atol=1e-5)  # oneDNN's kernel may round otherwise
    assert all("forward" not in m.__dict__ for m in linear_modules(model))  # the plain forward is back


@needs_packing
def test_a_weight_changed_in_place_is_packed_again():
    """Evaluate folds a round's adapter into the weights in place (models.load.loading.adapter_merged): a packed
    copy of the old weight must not survive it."""
    model = tiny_model("llama")
    input_ids, attention_mask = left_padded([6, 4])
    with torch.no_grad(), packed_linears(model, batch_hint=2):
        model(input_ids=input_ids, attention_mask=attention_mask)
    # In place as an optimizer writes (the version moves), then as peft folds (through .data: it does not).
    for change in (lambda weight: weight.mul_(1.5), lambda weight: weight.data.add_(0.25)):
        with torch.no_grad():
            for module in linear_modules(model):
                change(module.weight)
            plain = model(input_ids=input_ids, attention_mask=attention_mask).logits
            with packed_linears(model, batch_hint=2):
                packed = model(input_ids=input_ids, attention_mask=attention_mask).logits
        torch.testing.assert_close(packed, plain, rtol=1e-5, atol=1e-5)


def lora_model(monkeypatch, **lora_args):
    """The tiny Llama with a LoRA adapter on every projection, its B moved off zero, every layer packed."""
    import models.packing as packing
    from peft import LoraConfig, get_peft_model

    monkeypatch.setattr(packing, "PACK_MIN_WEIGHTS", 0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                        **lora_args)
    model = get_peft_model(tiny_model("llama"), config).get_base_model().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)
    return model


def lora_layers(model) -> list:
    return [m for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")]


@needs_packing
def test_packing_folds_a_lora_adapter_without_writing_the_root_weights(monkeypatch):
    """Evaluate runs a round's policy on packed weights with its adapter folded in by packing: the same
    logits as peft's in-place merge, while the root weights stay bit for bit as loaded."""
    import models.packing as packing
    from models.load.loading import adapter_merged, set_adapter_enabled

    model = lora_model(monkeypatch)
    input_ids, attention_mask = left_padded([6, 3, 8])
    assert packing.folds_adapters(model)
    with torch.no_grad():
        unmerged = model(input_ids=input_ids, attention_mask=attention_mask).logits
        with adapter_merged(model):  # (folding in and out leaves the roots changed by rounding)
            merged = model(input_ids=input_ids, attention_mask=attention_mask).logits
        roots = [layer.base_layer.weight.detach().clone() for layer in lora_layers(model)]
        with packed_linears(model, batch_hint=3):
            assert all("forward" in layer.__dict__ and "forward" not in layer.base_layer.__dict__ for layer in lora_layers(model))
            folded = model(input_ids=input_ids, attention_mask=attention_mask).logits
        set_adapter_enabled(model, False)
        root = model(input_ids=input_ids, attention_mask=attention_mask).logits
        with packed_linears(model, batch_hint=3):  # the adapter off: the root weights packed, not the fold
            packed_root = model(input_ids=input_ids, attention_mask=attention_mask).logits
        # one packed copy per layer, whichever way it computes (no second copy of every weight)
        assert all(layer in packing._PACKED and layer.base_layer not in packing._PACKED for layer in lora_layers(model))
        set_adapter_enabled(model, True)
        with packed_linears(model, batch_hint=3):  # on again: folded again, to the same values
            again = model(input_ids=input_ids, attention_mask=attention_mask).logits
    assert (unmerged - root).abs().max() > 1e-2  # the adapter moves the logits: the checks below can fail
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(folded, merged, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed_root, root, rtol=1e-5, atol=1e-5)
    assert torch.equal(again, folded)
    assert all(torch.equal(layer.base_layer.weight, weight) for layer, weight in zip(lora_layers(model), roots))


@needs_packing
def test_a_trained_adapter_is_folded_again_and_other_variants_are_not_folded(monkeypatch):
    import models.packing as packing

    model = lora_model(monkeypatch)
    input_ids, attention_mask = left_padded([5, 7])
    with torch.no_grad():
        with packed_linears(model, batch_hint=2):
            model(input_ids=input_ids, attention_mask=attention_mask)
        for layer in lora_layers(model):  # as a training step moves it (through .data: no version change)
            layer.lora_B["default"].weight.data.add_(0.1)
        plain = model(input_ids=input_ids, attention_mask=attention_mask).logits
        with packed_linears(model, batch_hint=2):
            packed = model(input_ids=input_ids, attention_mask=attention_mask).logits
    torch.testing.assert_close(packed, plain, rtol=1e-5, atol=1e-5)
    dora = lora_model(monkeypatch, use_dora=True)
    assert not packing.folds_adapters(dora) and not any(packing._lora_packing(layer)[0] for layer in lora_layers(dora))
    with torch.no_grad():  # DoRA computes on its own, on its packed root
        plain = dora(input_ids=input_ids, attention_mask=attention_mask).logits
        with packed_linears(dora, batch_hint=2):
            assert all(layer.base_layer in packing._PACKED for layer in lora_layers(dora))
            packed = dora(input_ids=input_ids, attention_mask=attention_mask).logits
    torch.testing.assert_close(packed, plain, rtol=1e-5, atol=1e-5)
    monkeypatch.setenv(packing.PACK_ENV, "0")
    assert not packing.folds_adapters(model)


@needs_packing
def test_static_generate_packs_on_cpu_unless_turned_off(monkeypatch):
    import models.packing as packing

    model = tiny_model("qwen2")
    input_ids, attention_mask = left_padded([3, 7])
    settings = SamplingSettings(temperature=0, max_new_tokens=8)
    static_generate(model, _Tok, input_ids, attention_mask, settings, [])
    assert set(linear_modules(model)) <= set(packing._PACKED.keys())  # every Linear, the LM head too
    release_sessions(model)
    assert not any(m in packing._PACKED for m in linear_modules(model))
    monkeypatch.setenv(packing.PACK_ENV, "0")
    static_generate(model, _Tok, input_ids, attention_mask, settings, [])
    assert not any(m in packing._PACKED for m in linear_modules(model))


def test_only_settings_decide_not_generation_config():
    model = tiny_model("qwen2")
    input_ids, attention_mask = left_padded([4, 7, 2])
    settings = SamplingSettings(temperature=0, max_new_tokens=10)
    plain = static_generate(model, _Tok, input_ids, attention_mask, settings, []).tokens
    release_sessions()
    model.generation_config.update(repetition_penalty=3.0, top_k=2, do_sample=True, temperature=0.1, no_repeat_ngram_size=1)
    assert torch.equal(static_generate(model, _Tok, input_ids, attention_mask, settings, []).tokens, plain)


def test_hf_backend_ignores_the_models_generation_config_too():
    from models.load.tokenizer import build_byte_tokenizer

    tokenizer = build_byte_tokenizer()
    model = tiny_model("llama", vocab=len(tokenizer))
    settings = SamplingSettings(temperature=0, max_new_tokens=10, backend="hf")
    plain = generate_texts(model, tokenizer, ["abc", "hello"], settings)
    model.generation_config.update(repetition_penalty=3.0, no_repeat_ngram_size=1)
    assert generate_texts(model, tokenizer, ["abc", "hello"], settings) == plain


def test_sampling_is_reproducible_with_a_seed():
    model = tiny_model("llama")
    input_ids, attention_mask = left_padded([5, 9, 2, 7])
    settings = SamplingSettings(temperature=1.0, top_p=0.9, max_new_tokens=16)

    def run(seed):
        torch.manual_seed(seed)
        return static_generate(model, _Tok, input_ids, attention_mask, settings, []).tokens

    first = run(3)
    assert torch.equal(run(3), first)
    assert _SESSIONS[model].stats["reuses"] == 1  # the second call reused the cache
    assert not torch.equal(run(4), first)
    assert len(set(first.flatten().tolist())) > 5  # it samples, not one token over and over


def test_top_p_never_leaves_the_nucleus():
    # probabilities 0.5, 0.3, 0.1, 0.06, 0.04: with top_p = 0.75 the nucleus is {0, 1} (0.8 >= 0.75).
    probs = torch.tensor([0.5, 0.3, 0.1, 0.06, 0.04])
    logits = probs.log()[torch.tensor([3, 0, 4, 1, 2])]  # shuffled: token 1 has p=0.5, token 3 p=0.3
    torch.manual_seed(0)
    picks = sample_next_tokens(logits.expand(20000, -1).clone(), temperature=1.0, top_p=0.75)
    counts = torch.bincount(picks, minlength=5)
    assert set(picks.unique().tolist()) == {1, 3}
    assert abs(counts[1].item() / 20000 - 0.5 / 0.8) < 0.02  # renormalised inside the nucleus
    # top_p = 1: every token can come up; greedy: always the argmax
    all_tokens = sample_next_tokens(logits.expand(20000, -1).clone(), temperature=1.0, top_p=1.0)
    assert set(all_tokens.unique().tolist()) == {0, 1, 2, 3, 4}
    assert set(sample_next_tokens(logits.expand(8, -1).clone(), 0.0, 0.5).tolist()) == {1}


@pytest.mark.parametrize("candidates", [256, 2], ids=["nucleus-in-top-k", "full-sort"])
def test_cpu_sampling_draws_the_renormalised_nucleus(monkeypatch, candidates):
    """The CPU sampler (a top-k, or the full sort when the nucleus is larger, then inverse transform
    sampling) draws each token of the nucleus as often as its renormalised probability says."""
    import models.generate.fast_generation as fast

    monkeypatch.setattr(fast, "TOP_P_CANDIDATES", candidates)
    probs = torch.tensor([0.3, 0.2, 0.15, 0.12, 0.09, 0.08, 0.04, 0.02])
    order = torch.tensor([5, 2, 7, 0, 3, 6, 1, 4])  # token order[i] has probability probs[i]
    logits = torch.empty(8)
    logits[order] = probs.log()
    draws = 40000
    torch.manual_seed(0)
    # top_p 0.7: the tokens of p 0.3, 0.2, 0.15, 0.12 stay (0.65 of mass before the fourth; 0.77 before the fifth)
    counts = torch.bincount(sample_next_tokens(logits.expand(draws, -1).clone(), 1.0, 0.7), minlength=8).float() / draws
    expected = torch.zeros(8)
    expected[order[:4]] = probs[:4] / probs[:4].sum()
    torch.testing.assert_close(counts, expected, atol=0.01, rtol=0)
    counts = torch.bincount(sample_next_tokens(logits.expand(draws, -1).clone(), 1.0, 1.0), minlength=8).float() / draws
    expected = torch.zeros(8)
    expected[order] = probs
    torch.testing.assert_close(counts, expected, atol=0.01, rtol=0)
    tempered = (probs.log() / 0.5).softmax(-1)  # temperature 0.5 sharpens: p^2, renormalised
    counts = torch.bincount(sample_next_tokens(logits.expand(draws, -1).clone(), 0.5, 1.0), minlength=8).float() / draws
    expected[order] = tempered
    torch.testing.assert_close(counts, expected, atol=0.01, rtol=0)


class _FixedHead(torch.nn.Module):
    """An lm_head that ignores the hidden state: the same next-token distribution at every step."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.register_buffer("logits", logits)

    def forward(self, hidden):
        return self.logits.to(hidden.dtype).expand(*hidden.shape[:-1], -1)


def test_top_p_through_the_decode_loop():
    model = tiny_model("llama")
    logits = torch.full((VOCAB,), -4.0)
    logits[[7, 11, 13]] = torch.tensor([2.0, 1.6, 1.2])  # these three hold ~93% of the mass
    model.lm_head = _FixedHead(logits)
    probs = logits.softmax(-1)
    input_ids, attention_mask = left_padded([3, 6] * 8)
    torch.manual_seed(0)
    top_p = float(probs[[7, 11]].sum()) - 0.01  # nucleus {7, 11}
    out = static_generate(model, _Tok, input_ids, attention_mask, SamplingSettings(temperature=1.0, top_p=top_p, max_new_tokens=20), []).tokens
    assert set(out.unique().tolist()) == {7, 11}


def test_stops_early_when_every_row_ended():
    model = tiny_model("qwen2")
    input_ids, attention_mask = left_padded([4, 6, 3])
    ref = hf_greedy(model, input_ids, attention_mask, 8, [])
    eos = sorted({row[1] for row in ref.tolist()})  # every row emits one of these by its 2nd token
    out = static_generate(model, _Tok, input_ids, attention_mask, SamplingSettings(temperature=0, max_new_tokens=40), eos).tokens
    assert out.shape == (3, 40)
    assert (out[:, 2:] == PAD).all()


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_compaction_runs_only_live_rows_and_changes_no_token(temperature, monkeypatch):
    """On a CPU rows that ended leave the decode step (once a quarter of its rows have): later steps run
    fewer rows, and every row's tokens and summed log-prob are those of the whole batch decoded to the end
    (the same random numbers per row; log-probs up to the attention kernel's rounding by batch size)."""
    import models.generate.fast_generation as fast

    model = tiny_model("llama", init_std=0.3)
    input_ids, attention_mask = left_padded([3, 8, 5, 2, 7, 4, 6, 9])
    ref = hf_greedy(model, input_ids, attention_mask, 6, [])
    eos = sorted({row[k] for k, row in zip([0, 1, 3, 5], ref.tolist())})  # rows end at different steps
    settings = SamplingSettings(temperature=temperature, max_new_tokens=24, logps=True)
    results, rows_run = {}, {}
    for compact in ("1", "0"):
        monkeypatch.setenv(fast.COMPACT_ENV, compact)
        release_sessions()
        rows_run[compact] = count_forward_rows(model, monkeypatch)
        torch.manual_seed(3)
        results[compact] = static_generate(model, _Tok, input_ids, attention_mask, settings, eos)[:2]
        monkeypatch.undo()  # the forward counter and the environment, before the next run sets its own
        monkeypatch.setattr(__import__("models.packing", fromlist=["x"]), "PACK_MIN_WEIGHTS", 0)
    (tokens, logps), (ref_tokens, ref_logps) = results["1"], results["0"]
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logps, ref_logps, rtol=0, atol=1e-5)
    assert (tokens == PAD).any()  # some rows did end early
    assert min(rows_run["1"][1:]) < 8 == min(rows_run["0"][1:])  # later steps ran fewer rows, not the whole batch
    assert sum(rows_run["1"]) < sum(rows_run["0"])


@pytest.mark.parametrize("backend, attn", [("hf", "sdpa"), ("static", "sdpa"), ("static", "eager")])
def test_continuations_scored_with_the_generation_equal_a_log_prob_pass(backend, attn, monkeypatch):
    """generate_and_score: each prompt's continuations get the summed log-probs a separate pass gives them;
    on the static backend from the prefill's own run of the prompt (several continuations of a prompt laid
    end to end in one row, none seeing another), so no forward sees a prompt twice."""
    from models.generate.generation import generate_and_score
    from models.logps import Encoded, batched_logps
    from models.load.tokenizer import build_byte_tokenizer

    tokenizer = build_byte_tokenizer()
    model = tiny_model("llama", attn, vocab=len(tokenizer), init_std=0.3)
    prompts = ["a", "hello there", "12+34=", "reverse: abcdef", "xyz"]
    ids = [tokenizer(text, add_special_tokens=False).input_ids for text in prompts]
    continuations = [[tokenizer(c, add_special_tokens=False).input_ids for c in cs]
                     for cs in (["b", "bcd"], [], ["46", "4", " 46 and more"], ["fedcba"], ["", "zyx"])]
    expected = batched_logps(model, tokenizer, [Encoded(p, c) for p, cs in zip(ids, continuations) for c in cs], 8, "cpu")[0]
    settings = SamplingSettings(num_samples=2, greedy_samples=1, temperature=1.0, max_new_tokens=8, batch_size=4, backend=backend)
    plain = generate_texts(model, tokenizer, prompts, settings)
    seen = []
    embed = model.get_input_embeddings()
    monkeypatch.setattr(embed, "forward", lambda x, f=embed.forward: seen.append(x.clone()) or f(x))
    samples, scores = generate_and_score(model, tokenizer, prompts, settings, continuations)
    assert samples == plain  # scoring leaves the samples as they were
    assert [len(s) for s in scores] == [len(cs) for cs in continuations]
    assert [x for row in scores for x in row] == pytest.approx(expected, abs=1e-4)
    assert scores[4][0] == 0.0  # an empty continuation has no tokens to score
    if backend == "static":  # each prompt's tokens went through the model once, in its prefill
        runs = [row.tolist() for x in seen if x.shape[1] > 1 for row in x]  # not the one-token decode steps
        for prompt in ids[1:]:  # ("a" is also how one continuation ends)
            assert sum(run[-len(prompt):] == prompt for run in runs) == 1


@pytest.mark.parametrize("backend, batch_size", [("static", 4), ("static", 3), ("hf", 4)],
                         ids=["static, prompts whole in a batch", "static, a prompt's samples in two batches", "hf"])
def test_continuations_known_once_decoded_are_scored_like_a_log_prob_pass(backend, batch_size):
    """generate_and_score's `later`: continuations that depend on a prompt's samples (Evaluate's round-0 pairs
    hold the first sample) are scored after decoding on the prefill's kept run of the prompt, where the prompt's
    samples were decoded in one batch, else by a log-prob pass; either way as a separate pass scores them.
    A sample's own tokens scored so equal the sum its decoding took."""
    from models.generate.generation import generate_and_score
    from models.logps import Encoded, batched_logps
    from models.load.tokenizer import build_byte_tokenizer

    tokenizer = build_byte_tokenizer()
    model = tiny_model("llama", vocab=len(tokenizer), init_std=0.3)
    prompts = ["a", "hello there", "12+34=", "xyz"]
    ids = [tokenizer(text, add_special_tokens=False).input_ids for text in prompts]
    continuations = [[tokenizer(c, add_special_tokens=False).input_ids] for c in ("b", "46", " 46 and more", "q")]
    settings = SamplingSettings(num_samples=2, greedy_samples=1, temperature=1.0, max_new_tokens=8, batch_size=batch_size,
                                backend=backend, logps=True)

    def later(p, samples):
        assert len(samples) == 2 and p in range(len(prompts))
        return [list(samples[1].token_ids), tokenizer(samples[1].text + "!", add_special_tokens=False).input_ids]

    release_sessions()
    samples, scores = generate_and_score(model, tokenizer, prompts, settings, continuations, later=later)
    assert samples == generate_texts(model, tokenizer, prompts, settings)  # scoring leaves the samples as they were
    wanted = [cs + later(p, samples[p]) for p, cs in enumerate(continuations)]
    expected = batched_logps(model, tokenizer, [Encoded(i, c) for i, cs in zip(ids, wanted) for c in cs], 8, "cpu")[0]
    assert [len(s) for s in scores] == [3] * len(prompts)
    assert [x for row in scores for x in row] == pytest.approx(expected, abs=1e-4)
    assert [row[1] for row in scores] == pytest.approx([s[1].logp for s in samples], abs=1e-4)


@pytest.mark.parametrize("q_len", [1, 5])
def test_static_attention_equals_transformers_sdpa(q_len):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal, module.training = 3, True, False
    gen = torch.Generator().manual_seed(0)
    query = torch.randn(2, 6, q_len, 16, generator=gen)
    key, value = torch.randn(2, 2, 24, 16, generator=gen), torch.randn(2, 2, 24, 16, generator=gen)
    mask = torch.rand(2, 1, q_len, 24, generator=gen) > 0.3
    mask[..., 0] = True
    ours, _ = static_sdpa_attention(module, query, key, value, mask, scaling=0.25)
    ref, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.25)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


def test_unsupported_models_are_detected():
    sliding = Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, use_sliding_window=True, sliding_window=8, max_window_layers=0)
    assert "layer types" in unsupported_reason(Qwen2ForCausalLM(sliding))
    assert unsupported_reason(tiny_model("llama")) is None


def windowed_model(family: str, window: int):
    """A tiny model of a family whose config sets one `sliding_window` for all layers and no `layer_types`."""
    import transformers

    config_class, model_class = (getattr(transformers, f"{family}{kind}") for kind in ("Config", "ForCausalLM"))
    torch.manual_seed(0)
    config = config_class(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=512, sliding_window=window,
                          pad_token_id=PAD, bos_token_id=1, eos_token_id=2, initializer_range=0.3)
    assert not getattr(config, "layer_types", None)
    model = model_class._from_config(config, attn_implementation="sdpa")
    model.generation_config.eos_token_id = None
    return model.eval()


@pytest.mark.parametrize("family", ["Mistral", "Phi3", "Starcoder2"])
def test_a_sliding_window_the_rows_outgrow_falls_back_to_hf(family, caplog):
    """One `sliding_window` for every layer (no `layer_types`): where prompt plus new tokens fit in it, the
    window masks nothing and the decode loop runs the model; longer, the hf backend does (the static cache
    and its mask would not match the window's), and the tokens are plain generate's either way."""
    model = windowed_model(family, window=8)
    input_ids, attention_mask = left_padded([5, 3, 5])
    assert unsupported_reason(model, 8) is None and "sliding window of 8" in unsupported_reason(model, 9)
    assert "sliding window of 8" in unsupported_reason(model)  # no length: it cannot know that the rows fit
    for max_new, falls_back in ((3, False), (12, True)):
        release_sessions()
        caplog.clear()
        ours = static_generate(model, _Tok, input_ids, attention_mask, SamplingSettings(temperature=0, max_new_tokens=max_new), []).tokens
        assert torch.equal(ours, hf_greedy(model, input_ids, attention_mask, max_new, [])), max_new
        assert ("using the hf backend" in caplog.text) == falls_back
        assert (model in _SESSIONS) == (not falls_back)


def test_continuations_longer_than_a_sliding_window_are_scored_by_a_log_prob_pass():
    """Scored continuations count as the rows' length too: each must fit in the window with its prompt (laid
    end to end in one row, they need not fit together: none attends to another). Either way every score
    equals a separate log-prob pass."""
    from models.generate.generation import generate_and_score
    from models.logps import Encoded, batched_logps
    from models.load.tokenizer import build_byte_tokenizer

    tokenizer = build_byte_tokenizer()
    model = windowed_model("Mistral", window=8)
    model.resize_token_embeddings(len(tokenizer))
    prompts = ["ab", "xyz"]
    ids = [tokenizer(text, add_special_tokens=False).input_ids for text in prompts]
    settings = SamplingSettings(temperature=0, max_new_tokens=3, batch_size=4, backend="static")
    for texts, static in (([["cde", "fgh", "ij"], ["q"]], True), ([["cdefghij"], ["q"]], False)):
        continuations = [[tokenizer(c, add_special_tokens=False).input_ids for c in cs] for cs in texts]
        expected = batched_logps(model, tokenizer, [Encoded(p, c) for p, cs in zip(ids, continuations) for c in cs], 8, "cpu")[0]
        release_sessions()
        _, scores = generate_and_score(model, tokenizer, prompts, settings, continuations)
        assert [x for row in scores for x in row] == pytest.approx(expected, abs=1e-4)
        assert (model in _SESSIONS) == static


# --- GPU ------------------------------------------------------------------------------------------

gpu = pytest.mark.skipif(not CUDA, reason="needs CUDA")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_gpu_graph_greedy_matches_hf_fp32(family):
    model = tiny_model(family, vocab=1000, layers=4).cuda()
    input_ids, attention_mask = left_padded([5, 40, 17, 1, 33, 64, 2, 9] * 4, vocab=1000, device="cuda")
    free = hf_greedy(model, input_ids, attention_mask, 48, [])
    eos = [free[0, 10].item()]
    ref = hf_greedy(model, input_ids, attention_mask, 48, eos)
    settings = SamplingSettings(temperature=0, max_new_tokens=48)
    ours = static_generate(model, _Tok, input_ids, attention_mask, settings, eos, cuda_graph=True).tokens
    assert _SESSIONS[model].graph is not None, "the decode step was not captured"
    assert_same_greedy(ours.cpu(), ref.cpu(), eos)
    again = static_generate(model, _Tok, input_ids, attention_mask, settings, eos, cuda_graph=True).tokens  # replayed session
    assert torch.equal(again, ours)


@pytest.mark.gpu
@gpu
def test_gpu_graph_sampling_is_random_and_reproducible():
    model = tiny_model("qwen2", vocab=1000).cuda()
    input_ids, attention_mask = left_padded([5, 12, 3, 8] * 4, vocab=1000, device="cuda")
    settings = SamplingSettings(temperature=1.0, top_p=0.95, max_new_tokens=32)

    def run(seed):
        torch.manual_seed(seed)
        return static_generate(model, _Tok, input_ids, attention_mask, settings, [], cuda_graph=True).tokens

    fresh = run(5)  # new session: capture happens inside this call
    assert _SESSIONS[model].graph is not None
    assert torch.equal(run(5), fresh)  # replayed session, same seed: same samples
    assert not torch.equal(run(6), fresh)
    # fresh noise at every replay: the columns (steps) are not copies of each other
    assert len({tuple(col) for col in fresh[:, 1:].T.tolist()}) > 25


def _train_counting_model(steps: int = 300):
    """A tiny Llama taught sequences a, a+d, a+2d, ... (mod vocab): peaked, non-random logits."""
    vocab = 64
    model = tiny_model("llama", vocab=vocab, layers=2).cuda().train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator(device="cuda").manual_seed(0)
    for _ in range(steps):
        start = torch.randint(1, vocab, (64, 1), device="cuda", generator=gen)
        step = torch.randint(1, 4, (64, 1), device="cuda", generator=gen)
        seq = (start + step * torch.arange(48, device="cuda")) % (vocab - 1) + 1
        loss = model(input_ids=seq, labels=seq).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), loss.item()


@pytest.mark.gpu
@gpu
def test_gpu_trained_model_bf16_greedy_matches_hf():
    model, loss = _train_counting_model()
    assert loss < 1.0
    model = model.to(torch.bfloat16)
    starts = torch.arange(1, 33, device="cuda")[:, None]
    lengths = [3 + (i % 7) for i in range(32)]
    width = max(lengths)
    input_ids = torch.full((32, width), PAD, dtype=torch.long, device="cuda")
    attention_mask = torch.zeros_like(input_ids)
    for row, length in enumerate(lengths):
        d = 1 + row % 3
        input_ids[row, width - length :] = (starts[row] + d * torch.arange(length, device="cuda")) % 63 + 1
        attention_mask[row, width - length :] = 1
    ref = hf_greedy(model, input_ids, attention_mask, 40, [])
    ours = static_generate(model, _Tok, input_ids, attention_mask, SamplingSettings(temperature=0, max_new_tokens=40), [], cuda_graph=True).tokens
    assert _SESSIONS[model].graph is not None
    assert_same_greedy(ours.cpu(), ref.cpu(), [])
