"""A tiny randomly initialised PairRM checkpoint in the PairRM-hf format, tokenizer included, built
offline: what tests/stages/judge/test_pairrm.py loads with models.judge.pairrm.PairRMJudge in place of the real weights."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import DebertaV2Config

from models.judge.pairrm import CAND1_PREFIX, CAND2_PREFIX, CAND_PREFIX, MAX_LENGTH, PREFIX_TOKENS, SOURCE_PREFIX, DebertaV2PairRM

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? The capital of France is Paris.",
    "Write a short poem about the sea and the wind.",
    "2 + 2 = 4, and 12 * 12 = 144; numbers are fine too!",
    "I love you! I hate you. Hello, hi, goodbye.",
]


def build_tiny_tokenizer(corpus: list[str] | None = None, vocab_size: int = 300):
    """An offline byte-level BPE tokenizer with DeBERTa's specials and PairRM's prefix tokens.

    Byte-level, so any text has ids (no [UNK] collapse in tests). Layout as PairRM-hf: [PAD] 0,
    [CLS] 1, [SEP] 2, [UNK] 3, then the vocabulary, then [MASK] and the four prefix tokens at the end.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["[PAD]", "[CLS]", "[SEP]", "[UNK]"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus or _CORPUS, trainer=trainer)
    tok.add_special_tokens(["[MASK]", *PREFIX_TOKENS])
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", unk_token="[UNK]", mask_token="[MASK]",
        extra_special_tokens=list(PREFIX_TOKENS),
        model_max_length=MAX_LENGTH,
        truncation_side="right",
    )


def tiny_pairrm_config(tokenizer, hidden_size: int = 32, num_layers: int = 2, num_heads: int = 2,
                       intermediate_size: int | None = None, drop_out: float = 0.05,
                       initializer_range: float = 0.02) -> DebertaV2Config:
    """PairRM-hf's config.json scaled down: same attention settings (relative, p2c+c2p, buckets, no
    absolute positions, no token types) and the extra PairRM keys pointing at `tokenizer`'s prefixes."""
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in PREFIX_TOKENS}
    return DebertaV2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=intermediate_size or 4 * hidden_size,
        hidden_act="gelu",
        max_position_embeddings=512,
        relative_attention=True,
        position_buckets=256,
        max_relative_positions=-1,
        norm_rel_ebd="layer_norm",
        share_att_key=True,
        pos_att_type=["p2c", "c2p"],
        position_biased_input=False,
        type_vocab_size=0,
        layer_norm_eps=1e-7,
        initializer_range=initializer_range,
        pad_token_id=tokenizer.pad_token_id,
        source_prefix_id=ids[SOURCE_PREFIX],
        cand1_prefix_id=ids[CAND1_PREFIX],
        cand2_prefix_id=ids[CAND2_PREFIX],
        cand_prefix_id=ids[CAND_PREFIX],
        drop_out=drop_out,
        n_tasks=1,
    )


def save_random_pairrm(
    out_dir: str | Path,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 2,
    intermediate_size: int | None = None,
    seed: int = 0,
    initializer_range: float = 0.5,
):
    """Write a randomly initialised PairRM (config.json, model.safetensors, tokenizer files) to
    `out_dir`, loadable by PairRMJudge; returns (model in eval mode, tokenizer).

    `initializer_range` defaults to 0.5, not DeBERTa's 0.02: at 0.02 a small random model gives logits
    that differ across inputs by ~1e-7, too little for a test to tell a right matrix from a wrong one.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer()
    config = tiny_pairrm_config(
        tokenizer, hidden_size, num_layers, num_heads, intermediate_size, initializer_range=initializer_range
    )
    torch.manual_seed(seed)
    model = DebertaV2PairRM(config).eval()
    model.save_pretrained(out_dir)  # config.architectures = ["DebertaV2PairRM"], safetensors by default
    tokenizer.save_pretrained(out_dir)
    return model, tokenizer
