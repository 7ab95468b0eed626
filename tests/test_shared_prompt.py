"""The shared-prompt forward (a pair's prompt run once) gives the log-probs and gradients of two full sequences."""

import pytest
import torch

from models.logps import Encoded, batched_logps, collate, collate_pairs, group_by_prompt, pair_tokens, sequence_logps, shares_prompt


def tiny_lora_llama(**config_overrides):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=256, **config_overrides)
    model = LlamaForCausalLM(config).float()
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():  # a moved adapter: B = 0 would leave the LoRA path out of the comparison
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    return model


def pairs(seed: int = 0, n: int = 5):
    """Pairs with prompts and completions of different lengths, one completion a single token."""
    g = torch.Generator().manual_seed(seed)
    chosen, rejected = [], []
    for i in range(n):
        prompt = torch.randint(3, 97, (int(torch.randint(1, 12, (1,), generator=g)),), generator=g).tolist()
        good = torch.randint(3, 97, (1 if i == 0 else int(torch.randint(1, 9, (1,), generator=g)),), generator=g).tolist()
        bad = torch.randint(3, 97, (int(torch.randint(1, 9, (1,), generator=g)),), generator=g).tolist()
        chosen.append(Encoded(prompt, good))
        rejected.append(Encoded(prompt, bad))
    return chosen, rejected


def lora_grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


def with_common_prefix(items: list[Encoded], prefix: list[int]) -> list[Encoded]:
    return [Encoded(prefix + item.prompt_ids, item.completion_ids) for item in items]


@pytest.mark.parametrize("prefix", [[], [5, 9, 11, 3, 40, 7]], ids=["distinct prompts", "a prefix every prompt shares"])
def test_shared_prompt_gives_the_log_probs_and_gradients_of_two_full_sequences(prefix, monkeypatch):
    import models.logps as logps

    model = tiny_lora_llama()
    assert shares_prompt(model)
    chosen, rejected = (with_common_prefix(side, prefix) for side in pairs())
    prefixes_run = []
    monkeypatch.setattr(logps, "shared_prefix", lambda *a, f=logps.shared_prefix: prefixes_run.append(f(*a)) or prefixes_run[-1])
    flat_sums, flat_counts = sequence_logps(model, collate(chosen + rejected, pad_id=0))
    flat_sums.pow(2).sum().backward()  # a loss that weighs every row differently
    flat_grads = lora_grads(model)
    model.zero_grad()
    shared_sums, shared_counts = sequence_logps(model, collate_pairs(chosen, rejected, pad_id=0))
    shared_sums.pow(2).sum().backward()
    shared_grads = lora_grads(model)

    assert prefixes_run == [len(prefix)]  # the shared prefix ran once (none among random prompts)
    assert torch.equal(shared_counts, flat_counts)
    torch.testing.assert_close(shared_sums, flat_sums, atol=1e-4, rtol=0)
    assert flat_grads.keys() == shared_grads.keys() and len(flat_grads) == 2 * 7 * 2  # A and B, 7 projections, 2 layers
    for name in flat_grads:
        assert flat_grads[name].abs().max() > 0, name
        torch.testing.assert_close(shared_grads[name], flat_grads[name], atol=1e-4, rtol=1e-3, msg=name)


def test_pairs_with_the_same_prompt_in_one_batch_share_all_of_it_but_its_last_token(monkeypatch):
    """Two pairs of one prompt (two judged rounds' pairs mixed, or a prompt asked twice) in one batch: every
    row starts with the whole prompt, yet the shared prefix stops a token short of it, since the prompt's
    last position must still run per row to predict each completion's first token."""
    import models.logps as logps

    model = tiny_lora_llama().eval()
    prompt = [5, 9, 11, 3, 40, 7, 21]
    chosen, rejected = [Encoded(prompt, [12, 13]), Encoded(prompt, [44])], [Encoded(prompt, [50, 51, 52]), Encoded(prompt, [60, 61])]
    prefixes_run = []
    monkeypatch.setattr(logps, "shared_prefix", lambda *a, f=logps.shared_prefix: prefixes_run.append(f(*a)) or prefixes_run[-1])
    with torch.no_grad():
        flat_sums, _ = sequence_logps(model, collate(chosen + rejected, pad_id=0))
        shared_sums, _ = sequence_logps(model, collate_pairs(chosen, rejected, pad_id=0))
    torch.testing.assert_close(shared_sums, flat_sums, atol=1e-4, rtol=0)
    assert prefixes_run == [len(prompt) - 1]


class _Tok:
    pad_token_id = 0


def test_evaluation_rows_sharing_prompts_get_the_log_probs_of_full_sequences(monkeypatch):
    """Held-out rows come in groups of one prompt (greedy answer, samples, a pair): batched_logps runs each
    prompt once for the whole group, in groups of different sizes, and gives every row its full-sequence sum."""
    import models.logps as logps

    model = tiny_lora_llama().eval()
    g = torch.Generator().manual_seed(3)
    items = []
    for prompt_len, copies in [(7, 4), (3, 1), (10, 6), (5, 2)]:
        prompt = torch.randint(3, 97, (prompt_len,), generator=g).tolist()
        items += [Encoded(prompt, torch.randint(3, 97, (int(torch.randint(1, 8, (1,), generator=g)),), generator=g).tolist())
                  for _ in range(copies)]
    order = torch.randperm(len(items), generator=g).tolist()  # a prompt's rows need not be adjacent
    items = [items[i] for i in order]
    expected = [sequence_logps(model, collate([item], pad_id=0))[0].item() for item in items]
    prompts_run = []
    original = logps._shared_prompt_logps
    monkeypatch.setattr(logps, "_shared_prompt_logps", lambda m, b, *rest: prompts_run.append(int(b["prompt_ids"].shape[0])) or original(m, b, *rest))
    sums, counts = batched_logps(model, _Tok, items, 5, torch.device("cpu"))
    torch.testing.assert_close(torch.tensor(sums), torch.tensor(expected), atol=1e-4, rtol=0)
    assert counts == [len(item.completion_ids) for item in items]
    assert sum(prompts_run) == 4 + 1  # four prompts, the six-row one split across two batches of five


def test_group_by_prompt_keeps_batches_within_size_and_every_item_once():
    items = [Encoded([1, 2], [3]), Encoded([4], [5, 6]), Encoded([1, 2], [7, 8, 9]), Encoded([4], [1]), Encoded([9, 9, 9], [2])]
    batches = group_by_prompt(items, 3)
    assert sorted(i for batch in batches for i in batch) == list(range(5))
    assert all(len(batch) <= 3 for batch in batches)
    for batch in batches:  # a prompt's rows stay together within a batch
        prompts = [tuple(items[i].prompt_ids) for i in batch]
        assert prompts == sorted(prompts, key=prompts.index)


def test_pair_tokens_counts_each_prompt_twice_as_a_pair_and_once_as_run():
    chosen, rejected = pairs()
    prompts = sum(len(c.prompt_ids) for c in chosen)
    completions = sum(len(c.completion_ids) + len(r.completion_ids) for c, r in zip(chosen, rejected))
    assert pair_tokens(collate_pairs(chosen, rejected, 0)) == (2 * prompts + completions, prompts + completions)
    assert pair_tokens(collate(chosen + rejected, 0)) == (2 * prompts + completions,) * 2


def test_pairs_must_share_their_prompt():
    chosen, rejected = pairs()
    rejected[2] = Encoded(rejected[2].prompt_ids + [5], rejected[2].completion_ids)
    with pytest.raises(ValueError, match="pair 2"):
        collate_pairs(chosen, rejected, 0)


def test_models_that_cannot_share_a_prompt_run_pairs_as_two_sequences():
    assert not shares_prompt(tiny_lora_llama(layer_types=["sliding_attention", "full_attention"], sliding_window=4))
    model = tiny_lora_llama()
    model.get_base_model().gradient_checkpointing_enable()
    assert not shares_prompt(model)
