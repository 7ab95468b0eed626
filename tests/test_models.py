"""Model-side pieces: tokenizer loading, log-probs, checkpoints, LoRA and the trainer's batching."""

import json

import pytest
import torch
import torch.nn.functional as F

from common.errors import ModelError
from configs.recipe import ModelConfig, TrainingConfig
from models.load.loading import (
    ADAPTER_DIR,
    CHAIN,
    add_lora,
    check_model_path,
    checkpoint_info,
    load_causal_lm,
    load_policy,
    load_tokenizer,
    save_checkpoint,
)
from models.logps import _has_plain_head, collate, encode, sequence_logps
from models.load.tokenizer import build_byte_tokenizer
from models.train.trainer import length_grouped_batches

FP32 = ModelConfig(precision="fp32")


def tiny_model(family: str = "llama", vocab: int = 300):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    kwargs = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256)
    if family == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**kwargs))
    return LlamaForCausalLM(LlamaConfig(**kwargs))


@pytest.fixture
def saved(tmp_path):
    tok = build_byte_tokenizer()
    model = tiny_model("qwen2")
    model.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    return tmp_path / "base", tok


def test_byte_tokenizer_beside_a_qwen2_config_loads_as_itself(saved):
    path, tok = saved
    loaded = load_tokenizer(str(path), FP32)
    text = "<|user|>Sort: 3 1 2<|end|><|assistant|>"
    assert loaded(text, add_special_tokens=False).input_ids == tok(text, add_special_tokens=False).input_ids


def test_model_paths_are_checked_in_one_line(tmp_path):
    with pytest.raises(ModelError, match="not a model directory"):
        check_model_path(str(tmp_path))
    with pytest.raises(ModelError, match="does not exist"):
        check_model_path(str(tmp_path / "missing"))
    check_model_path("Qwen/Qwen2.5-0.5B-Instruct")  # a hub id is left to from_pretrained


# Families that transform their logits after the LM head, each with a strong setting so a wrong path shows.
SCALED_HEADS = {
    "granite": {"logits_scaling": 4.0},
    "gemma2": {"final_logit_softcapping": 0.5, "head_dim": 8},
    "cohere": {"logit_scale": 0.25},
    "falcon_h1": {"lm_head_multiplier": 3.0, "head_dim": 8, "mamba_d_ssm": 32, "mamba_n_heads": 4, "mamba_d_head": 8,
                  "mamba_d_state": 8, "mamba_n_groups": 1, "mamba_chunk_size": 16},
}


def family_model(family: str):
    if family in ("llama", "qwen2"):
        return tiny_model(family)
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(family, vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, **SCALED_HEADS[family])
    return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("family", ["llama", "qwen2", *SCALED_HEADS])
def test_sequence_logps_match_full_logits(family):
    model = family_model(family).eval()
    tok = build_byte_tokenizer()
    items = [encode(tok, "<|user|>hi<|end|><|assistant|>", "there<|end|>", 64), encode(tok, "<|user|>a<|end|><|assistant|>", "bc<|end|>", 64)]
    batch = collate(items, tok.pad_token_id)
    sums, counts = sequence_logps(model, batch)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    logprobs = F.log_softmax(logits[:, :-1], -1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    expected = (logprobs * batch["completion_mask"][:, 1:]).sum(1)
    assert torch.allclose(sums, expected, atol=1e-4)
    assert counts.tolist() == [len(items[0].completion_ids), len(items[1].completion_ids)]


def test_pad_rows_right_left_and_to_a_multiple():
    from models.padding import pad_rows

    ids, mask = pad_rows([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    ids, mask = pad_rows([[5, 6, 7], [8]], pad_id=0, side="left")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    ids, mask = pad_rows([[5, 6, 7], [8]], pad_id=9, multiple=4)
    assert ids.tolist() == [[5, 6, 7, 9], [8, 9, 9, 9]] and mask.tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]


def test_collate_marks_the_completion_tokens():
    from models.logps import Encoded

    batch = collate([Encoded([1, 2], [3]), Encoded([4], [5, 6, 7])], pad_id=0, pad_to_multiple=1)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 0], [4, 5, 6, 7]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    assert batch["completion_mask"].tolist() == [[False, False, True, False], [False, True, True, True]]


def test_only_known_plain_heads_take_the_chunked_path():
    from transformers import LlamaConfig

    assert _has_plain_head(tiny_model("llama")) and _has_plain_head(tiny_model("qwen2"))
    assert _has_plain_head(add_lora(tiny_model("llama"), TrainingConfig(lora_r=2, lora_alpha=4)))  # through PEFT
    for family in SCALED_HEADS:
        assert not _has_plain_head(family_model(family)), family
    nested = tiny_model("llama")  # a listed family whose config still nests a soft-cap in a sub-config
    nested.config.text_config = LlamaConfig(final_logit_softcapping=30.0)
    assert not _has_plain_head(nested)
    remote = type("RemoteLlama", (type(tiny_model("llama")),), {"__module__": "transformers_modules.org.model"})
    assert not _has_plain_head(remote(tiny_model("llama").config))


def test_every_family_that_transforms_its_logits_after_the_head_names_a_field_the_head_check_reads():
    """The chunked head is chosen from the config (models.logps.LOGIT_TRANSFORM_FIELDS), not from a list of families:
    every modeling file of the installed transformers whose forward changes `logits` after `self.lm_head(...)` (or the
    decoder's hidden states before it: MiniCPM3 divides them) must use one of those fields, or a new family would take
    the chunked head and get other log-probs than its own."""
    import re
    from pathlib import Path

    import transformers

    from models.logps import LOGIT_TRANSFORM_FIELDS

    assignment = re.compile(r"^\s*logits = (.*)$")
    unread, transforming = [], 0
    for path in sorted((Path(transformers.__file__).parent / "models").glob("*/modeling_*.py")):
        text = path.read_text()
        lines = text.splitlines()
        for i, line in enumerate(lines):
            if "logits = self.lm_head(" not in line:
                continue
            changed = [after for after in lines[i + 1 : i + 12] if (found := assignment.match(after))
                       and not re.fullmatch(r"(self\.lm_head|logits\.(float|to|contiguous))\(.*\)", found.group(1).strip())]
            changed += [before for before in lines[max(0, i - 8) : i] if re.match(r"^\s*hidden_states = hidden_states [/*]", before)]
            transforming += len(changed)
            if changed and not any(field in text for field in LOGIT_TRANSFORM_FIELDS):
                unread += [f"{path.parent.name}: {line.strip()}" for line in changed]
    assert transforming >= 10 and unread == []


def test_encode_keeps_the_prompt_end_and_the_completion_start():
    tok = build_byte_tokenizer()
    assert [len(x) for x in (encode(tok, "p" * 20, "c" * 30, 60).prompt_ids, encode(tok, "p" * 20, "c" * 30, 60).completion_ids)] == [20, 30]
    both_long = encode(tok, "p" * 50, "c" * 50, max_length=60)
    assert (len(both_long.prompt_ids), len(both_long.completion_ids)) == (30, 30)
    long_prompt = encode(tok, "p" * 100, "c" * 5, max_length=60)
    assert (len(long_prompt.prompt_ids), len(long_prompt.completion_ids)) == (55, 5)
    long_completion = encode(tok, "p" * 20, "c" * 100, max_length=60)
    assert (len(long_completion.prompt_ids), len(long_completion.completion_ids)) == (20, 40)


def test_a_pair_shares_one_prompt_cut_once_by_the_longer_side():
    import pandas as pd

    from models.logps import encode_pair
    from models.train.trainer import encode_pairs

    tok = build_byte_tokenizer()
    chosen, rejected = encode_pair(tok, "p" * 50, "c" * 40, "r" * 5, max_length=60)
    assert chosen.prompt_ids == rejected.prompt_ids and len(chosen.prompt_ids) == 30  # TRL: decided on the longest side
    assert (len(chosen.completion_ids), len(rejected.completion_ids)) == (30, 5)
    # A prompt within the pipeline's prompt limit is never cut; the completions share what is left.
    chosen, rejected = encode_pair(tok, "p" * 50, "c" * 40, "r" * 5, max_length=60, max_prompt_length=50)
    assert chosen.prompt_ids == rejected.prompt_ids and (len(chosen.prompt_ids), len(chosen.completion_ids)) == (50, 10)
    # Through the trainer: a long ground truth and a short sample get the same prompt tokens.
    pairs = pd.DataFrame({"prompt": ["q" * 40], "chosen": ["long answer " * 10], "rejected": ["short"]})
    [good], [bad] = encode_pairs(tok, pairs, max_length=64)
    assert good.prompt_ids == bad.prompt_ids and len(good) <= 64 and len(bad) <= 64


def test_generation_keeps_only_prompts_that_fit_beside_a_full_sample(saved, tmp_path):
    import pandas as pd

    from common.errors import DataError
    from configs.recipe import recipe_from_dict
    from models.generate.generation import generate_round

    path, _ = saved
    # 40 tokens of training sequence, 8 of them for the sample: prompts over 32 tokens could not be trained on whole.
    data = {"model": {"precision": "fp32"}, "data": {"max_prompt_tokens": 128}, "generation": {"max_new_tokens": 8},
            "training": {"max_length": 40}}
    prompts = pd.DataFrame({"prompt_id": ["fits", "long"], "prompt": ["x" * 10, "y" * 30], "system": [None, None],
                            "reference": ["a", "b"]})
    frame, stats = generate_round(recipe_from_dict(data), str(path), prompts, 1, tmp_path / "work")
    assert list(frame.prompt_id) == ["fits"] and stats["prompts_too_long"] == 1
    data["data"]["overlong_prompts"] = "error"
    with pytest.raises(DataError, match=r"row 1: field 'prompt' is \d+ tokens, over training.max_length - generation.max_new_tokens=32"):
        generate_round(recipe_from_dict(data), str(path), prompts, 1, tmp_path / "work2")


def trained_adapter(path, tok):
    """A LoRA model whose adapter is not zero, one encoded example and its log-prob under the model."""
    model = add_lora(load_causal_lm(str(path), FP32), TrainingConfig(lora_r=4, lora_alpha=8))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    item = encode(tok, "<|user|>x<|end|><|assistant|>", "y<|end|>", 32)
    expected, _ = sequence_logps(model.eval(), collate([item], tok.pad_token_id))
    return model, item, expected


def test_checkpoint_is_adapter_on_the_root_plus_a_merged_export_that_loads_alone(saved, tmp_path):
    from transformers import AutoModelForCausalLM

    path, tok = saved
    model, item, expected = trained_adapter(path, tok)
    out = tmp_path / "ckpt"
    save_checkpoint(model, tok, out, parent=str(path), root_model="root", root_path=str(path), round_idx=1, model_cfg=FP32)
    assert (out / "config.json").is_file() and (out / ADAPTER_DIR / "adapter_model.safetensors").is_file()
    assert not list(out.glob("*.bin")) and list(out.glob("*.safetensors"))
    assert json.loads((out / ADAPTER_DIR / "adapter_config.json").read_text())["base_model_name_or_path"] == str(path)
    assert checkpoint_info(out) == {"round": 1, "parent": str(path), "root_model": "root", "root_path": str(path),
                                    "chain": CHAIN, "merged": True}
    merged = AutoModelForCausalLM.from_pretrained(out).eval()  # from_pretrained alone
    got, _ = sequence_logps(merged, collate([item], tok.pad_token_id))
    assert torch.allclose(got, expected, atol=1e-4)
    adapter_and_base = AutoModelForCausalLM.from_pretrained(out / ADAPTER_DIR).eval()  # transformers reads the root from it
    got, _ = sequence_logps(adapter_and_base, collate([item], tok.pad_token_id))
    assert torch.allclose(got, expected, atol=1e-4)


def test_adapter_only_checkpoint_is_loaded_on_the_root(saved, tmp_path):
    path, tok = saved
    model, item, expected = trained_adapter(path, tok)
    out = tmp_path / "ckpt"
    save_checkpoint(model, tok, out, parent=str(path), root_model="root", root_path=str(path), round_idx=1, model_cfg=FP32,
                    save_merged=False)
    assert not (out / "config.json").exists()
    rebuilt = load_policy(str(out), FP32, merge=False)
    got, _ = sequence_logps(rebuilt, collate([item], tok.pad_token_id))
    assert torch.equal(got, expected)


def test_fresh_lora_is_the_reference():
    model = add_lora(tiny_model(), TrainingConfig(lora_r=4, lora_alpha=8)).eval()
    tok = build_byte_tokenizer()
    batch = collate([encode(tok, "<|user|>q<|end|><|assistant|>", "a<|end|>", 32)], tok.pad_token_id)
    policy, _ = sequence_logps(model, batch)
    with model.disable_adapter():
        reference, _ = sequence_logps(model, batch)
    assert torch.equal(policy, reference)


def test_the_reference_pass_skips_a_fresh_adapter_and_only_a_fresh_one():
    """A fresh adapter (B = 0) adds exactly zero, so round 1's reference pass runs the root weights alone; an
    adapter that moved is the reference as it is (training.reference previous)."""
    from peft.tuners.lora import LoraLayer

    from models.load.loading import adapter_is_zero
    from models.train.trainer import _reference_model

    def switched_off(model):
        return all(m.disable_adapters for m in model.modules() if isinstance(m, LoraLayer))

    model = add_lora(tiny_model(), TrainingConfig(lora_r=4, lora_alpha=8)).eval()
    assert adapter_is_zero(model)
    with _reference_model(model, "previous", None):
        assert switched_off(model)
    assert not switched_off(model)  # switched back on after
    with torch.no_grad():
        next(p for name, p in model.named_parameters() if "lora_B" in name)[0, 0] = 1e-3
    assert not adapter_is_zero(model)
    with _reference_model(model, "previous", None):
        assert not switched_off(model)


def test_length_grouped_batches_cover_everything_once_and_group_lengths():
    lengths = [i % 37 for i in range(400)]
    batches = length_grouped_batches(lengths, 8, seed=3)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(400))
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)
    assert spread < 5  # random batches would spread over ~30
    assert batches == length_grouped_batches(lengths, 8, seed=3) and batches != length_grouped_batches(lengths, 8, seed=4)


def test_fallback_chat_template_ends_completions_with_eos_so_a_base_model_learns_to_stop(tmp_path):
    from data.prompts import format_completion, format_prompt
    from models.generate.generation import generate_texts
    from models.generate.sampling import SamplingSettings
    from models.train.sft import encode_examples, supervised_finetune

    tok = build_byte_tokenizer()
    tok.chat_template = None  # a base model's tokenizer: no template of its own
    model = tiny_model("llama", vocab=len(tok))
    model.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    loaded = load_tokenizer(str(tmp_path / "base"), FP32)
    completion = format_completion(loaded, "hi", "ok")
    assert completion == " ok" + loaded.eos_token  # nothing after the EOS: the loss ends where generation stops
    assert loaded(completion, add_special_tokens=False).input_ids[-1] == loaded.eos_token_id
    assert format_prompt(loaded, "hi") + completion == loaded.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}], tokenize=False)

    examples = encode_examples(loaded, [{"prompt": "hi", "reference": "ok"}], max_length=64)
    supervised_finetune(model, loaded, examples, steps=60, batch_size=1, learning_rate=1e-2, seed=0, device="cpu")
    [[sample]] = generate_texts(model, loaded, [format_prompt(loaded, "hi")], SamplingSettings(temperature=0.0, max_new_tokens=12))
    assert sample.text == "ok" and sample.finished


def test_tokenizer_without_template_or_eos_is_refused(tmp_path):
    tok = build_byte_tokenizer()
    tok.chat_template = None
    tok.eos_token = None
    tiny_model("llama").save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    with pytest.raises(ModelError, match="neither a chat template nor an eos token"):
        load_tokenizer(str(tmp_path / "base"), FP32)


def test_samples_keep_their_token_ids_with_the_ending_eos():
    from models.generate.generation import _decode

    tok = build_byte_tokenizer()
    eos, pad = tok.eos_token_id, tok.pad_token_id
    text_ids = tok(" x \n", add_special_tokens=False).input_ids
    finished, cut = _decode(tok, torch.tensor([text_ids + [eos, pad], text_ids + text_ids[:2]]), [eos])
    assert finished.text == "x" and finished.finished and finished.token_ids == text_ids + [eos]
    assert not cut.finished and cut.token_ids == text_ids + text_ids[:2]
    assert finished.num_tokens == len(finished.token_ids) and cut.num_tokens == len(cut.token_ids)


def test_eval_scores_the_sampled_ids_and_one_prompt_per_held_out_pair():
    import pandas as pd

    from data.prompts import format_prompt
    from models.evaluate.evaluation import encode_eval_rows

    tok = build_byte_tokenizer()
    sampled = tok(" x \n", add_special_tokens=False).input_ids + [tok.eos_token_id]  # decoded and stripped: "x"
    prompts = pd.DataFrame({"prompt_id": ["p"], "prompt": ["q" * 1500], "system": [None]}).set_index("prompt_id")
    frame = pd.DataFrame({
        "prompt_id": ["p"] * 3, "kind": ["sample", "pair_chosen", "pair_rejected"], "response": ["x", "long " * 500, "x"],
        "token_ids": [sampled, None, None],
    })
    sample, chosen, rejected = encode_eval_rows(tok, frame, prompts)
    assert sample.prompt_ids == tok(format_prompt(tok, "q" * 1500), add_special_tokens=False).input_ids
    assert sample.completion_ids == sampled  # not the re-tokenised "x<|end|>"
    # A long prompt and a long reference: cut once for the pair, so both sides see the same prompt tokens.
    assert chosen.prompt_ids == rejected.prompt_ids and len(chosen) <= 2048
