"""Padding token-id rows into one batch: the one routine training, scoring, generation and PairRM use.

Right padding for everything that reads every position (training, log-probs, PairRM); left padding
for generation, so every row's last prompt token sits at the end and new tokens follow it directly.
"""

from __future__ import annotations

from typing import Literal

import torch


def pad_rows(rows: list[list[int]], pad_id: int, side: Literal["right", "left"] = "right",
             multiple: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both `(len(rows), width)` long tensors: each row padded with `pad_id`
    on `side` to the longest row, its width rounded up to a `multiple`; the mask is 1 on real tokens."""
    width = max(len(row) for row in rows)
    width = -(-width // multiple) * multiple
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for n, row in enumerate(rows):
        span = slice(0, len(row)) if side == "right" else slice(width - len(row), width)
        input_ids[n, span] = torch.tensor(row, dtype=torch.long)
        attention_mask[n, span] = 1
    return input_ids, attention_mask
