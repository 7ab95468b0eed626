"""Every loss against hand-computed values, TRL's DPOTrainer (an independent implementation) and the sign of
its gradients."""

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from models.train.losses import (
    LOSSES, PreferenceBatch, chosen_nll, dpo_sigmoid, hinge, implicit_rewards, inpo, robust, simpo, sppo,
)


def batch(pc, pr, rc=0.0, rr=0.0, beta=0.1, **kw):
    t = lambda x: torch.tensor([x], dtype=torch.float64, requires_grad=True)  # noqa: E731
    return PreferenceBatch(t(pc), t(pr), torch.tensor([rc], dtype=torch.float64), torch.tensor([rr], dtype=torch.float64),
                           beta, **kw)


def extras():
    return dict(chosen_win_prob=torch.tensor([0.8], dtype=torch.float64), rejected_win_prob=torch.tensor([0.3], dtype=torch.float64),
                chosen_lengths=torch.tensor([4.0], dtype=torch.float64), rejected_lengths=torch.tensor([5.0], dtype=torch.float64),
                base_chosen_logps=torch.tensor([-5.0], dtype=torch.float64),
                base_rejected_logps=torch.tensor([-5.0], dtype=torch.float64), inpo_eta=10.0, inpo_tau=0.02)


def test_dpo_sigmoid_equal_logratios_is_ln2():
    assert dpo_sigmoid(batch(-3.0, -5.0, -3.0, -5.0)).item() == pytest.approx(math.log(2))


def test_dpo_sigmoid_with_label_smoothing_is_conservative_dpo():
    # cDPO: -(1 - eps) log sigma(beta m) - eps log sigma(-beta m). At m = 0 both terms are log 2 whatever eps;
    # with eps = 0.1, beta = 0.5, m = 3: -0.9 log sigma(1.5) - 0.1 log sigma(-1.5) = 0.9 * 0.201413 + 0.1 * 1.701413.
    assert dpo_sigmoid(batch(-2.0, -6.0, -3.0, -4.0, beta=0.5, label_smoothing=0.1)).item() == pytest.approx(0.351413, abs=1e-6)
    assert dpo_sigmoid(batch(-3.0, -5.0, -3.0, -5.0, label_smoothing=0.2)).item() == pytest.approx(math.log(2))
    # Its gradient vanishes where sigma(beta m) = 1 - eps: the margin it settles at, log((1 - eps) / eps) / beta.
    at_min = batch(math.log(0.9 / 0.1) / 0.5, 0.0, beta=0.5, label_smoothing=0.1)
    dpo_sigmoid(at_min).sum().backward()
    assert at_min.policy_chosen_logps.grad.abs().item() < 1e-12


def test_hinge_is_one_at_no_margin_and_zero_beyond_one_over_beta():
    assert hinge(batch(0.0, 0.0)).item() == pytest.approx(1.0)
    assert hinge(batch(20.0, 0.0, beta=0.1)).item() == 0.0  # beta * margin = 2 > 1


def test_robust_without_noise_is_dpo():
    b = batch(-1.0, -3.0, -2.0, -2.5, beta=0.3)
    assert robust(b).item() == pytest.approx(dpo_sigmoid(b).item())


def test_sppo_hand_computed_and_zero_at_its_targets():
    # eta = 1/beta = 2; log-ratios h_w = -1 - (-2) = 1, h_l = -4 - (-3) = -1; targets eta (P - 1/2) = 0.8 and -0.6:
    # ((1 - 0.8)^2 + (-1 + 0.6)^2) / 2 = (0.04 + 0.16) / 2 = 0.1.
    b = batch(-1.0, -4.0, -2.0, -3.0, beta=0.5, chosen_win_prob=torch.tensor([0.9]), rejected_win_prob=torch.tensor([0.2]))
    assert sppo(b).item() == pytest.approx(0.1)
    # Zero exactly when each log-ratio equals eta * (P - 1/2).
    at_min = batch(-2.0 + 0.8, -3.0 - 0.6, -2.0, -3.0, beta=0.5, chosen_win_prob=torch.tensor([0.9]),
                   rejected_win_prob=torch.tensor([0.2]))
    assert sppo(at_min).item() == pytest.approx(0.0, abs=1e-12)


# --- against TRL 1.16's DPOTrainer, an implementation written independently of ours --------------------

def trl_loss(loss_type: str, beta: float, logps, ref_logps, lengths, label_smoothing: float = 0.0):
    """TRL's loss of one pair and its gradient with respect to the policy's (chosen, rejected) log-probs.

    DPOTrainer._compute_loss is called as a plain function on the least it reads: a stand-in model whose
    per-token log-probs spread each summed log-prob evenly over its completion tokens, precomputed
    reference log-probs, and no logging beyond TRL's own metric dict. Completion tokens start at
    position 1, so TRL's token counts (of the completion mask) are the lengths given.
    """
    from trl import DPOTrainer

    policy = torch.tensor(logps, dtype=torch.float64, requires_grad=True)
    width = max(lengths) + 1
    completion_mask = torch.zeros((2, width), dtype=torch.long)
    for row, n in enumerate(lengths):
        completion_mask[row, 1 : n + 1] = 1
    shifted = completion_mask[:, 1:].double()
    per_token = policy[:, None] * shifted / torch.tensor(lengths, dtype=torch.float64)[:, None]

    def model(**kwargs):
        zeros = torch.zeros_like(shifted)
        return SimpleNamespace(log_probs=per_token, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())

    accelerator = SimpleNamespace(device="cpu", gather=lambda t: t, gather_for_metrics=lambda t: t)
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=accelerator, aux_loss_enabled=False, ld_alpha=None,
        precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0],
        beta=beta, label_smoothing=label_smoothing, use_weighting=False,
        _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1,
    )
    inputs = {"input_ids": torch.ones((2, width), dtype=torch.long), "attention_mask": torch.ones((2, width), dtype=torch.long),
              "completion_mask": completion_mask, "ref_chosen_logps": torch.tensor([ref_logps[0]], dtype=torch.float64),
              "ref_rejected_logps": torch.tensor([ref_logps[1]], dtype=torch.float64)}
    loss = DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
    loss.backward()
    return loss.item(), policy.grad.tolist()


# Pairs on both sides of the preference, far and near, and with unequal lengths (for the per-token losses).
PAIRS = [
    ((-12.0, -15.0), (-13.0, -14.0), (4, 6)),
    ((-30.0, -22.0), (-28.0, -25.0), (10, 7)),
    ((-5.0, -5.0), (-5.0, -5.0), (3, 3)),
    ((-2.0, -40.0), (-9.0, -11.0), (2, 12)),
]
AGAINST_TRL = [("dpo_sigmoid", "sigmoid", 0.0), ("hinge", "hinge", 0.0), ("ipo", "ipo", 0.0), ("robust", "robust", 0.0),
               ("robust", "robust", 0.2)]


@pytest.mark.parametrize("beta", [0.1, 0.5])
@pytest.mark.parametrize("ours, theirs, label_smoothing", AGAINST_TRL)
@pytest.mark.parametrize("logps, ref_logps, lengths", PAIRS)
def test_loss_and_gradient_equal_trls_dpo_trainer(ours, theirs, label_smoothing, beta, logps, ref_logps, lengths):
    expected, expected_grad = trl_loss(theirs, beta, logps, ref_logps, lengths, label_smoothing)
    b = batch(*logps, *ref_logps, beta=beta, label_smoothing=label_smoothing,
              chosen_lengths=torch.tensor([float(lengths[0])], dtype=torch.float64),
              rejected_lengths=torch.tensor([float(lengths[1])], dtype=torch.float64))
    loss = LOSSES[ours](b)
    loss.sum().backward()
    assert loss.item() == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert [b.policy_chosen_logps.grad.item(), b.policy_rejected_logps.grad.item()] == pytest.approx(expected_grad, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("beta", [0.1, 0.5])
@pytest.mark.parametrize("logps, ref_logps, lengths", PAIRS)
def test_sppo_with_hard_labels_is_half_of_trls_sppo_hard(beta, logps, ref_logps, lengths):
    # TRL's sppo_hard is SPPO's Eq. 4.7 with P = 1 for the chosen and 0 for the rejected, the two squares
    # summed; uclaml/SPPO's trainer, and ours, average them.
    expected, expected_grad = trl_loss("sppo_hard", beta, logps, ref_logps, lengths)
    b = batch(*logps, *ref_logps, beta=beta, chosen_win_prob=torch.tensor([1.0], dtype=torch.float64),
              rejected_win_prob=torch.tensor([0.0], dtype=torch.float64))
    loss = sppo(b)
    loss.sum().backward()
    assert 2 * loss.item() == pytest.approx(expected, rel=1e-9)
    assert [2 * b.policy_chosen_logps.grad.item(), 2 * b.policy_rejected_logps.grad.item()] == pytest.approx(expected_grad, rel=1e-9)


def test_simpo_is_reference_free_and_closed_form():
    b = batch(-4.0, -10.0, rc=-100.0, rr=50.0, beta=2.0, chosen_lengths=torch.tensor([2.0]), rejected_lengths=torch.tensor([5.0]),
              simpo_gamma=0.5)
    z = 2.0 * (-4.0 / 2) - 2.0 * (-10.0 / 5) - 0.5
    assert simpo(b).item() == pytest.approx(math.log1p(math.exp(-z)))


def inpo_batch(pc, pr, rc, rr, bc, br, eta, tau):
    return batch(pc, pr, rc, rr, beta=0.1, base_chosen_logps=torch.tensor([bc], dtype=torch.float64),
                 base_rejected_logps=torch.tensor([br], dtype=torch.float64), inpo_eta=eta, inpo_tau=tau)


def test_inpo_closed_form():
    # h = (pc - pr) - eta*tau (bc - br) - (1 - eta*tau)(rc - rr); loss = (h - eta/2)^2.
    eta, tau = 4.0, 0.125  # eta * tau = 1/2
    b = inpo_batch(-2.0, -6.0, -3.0, -4.0, -1.0, -7.0, eta, tau)
    h = 4.0 - 0.5 * 6.0 - 0.5 * 1.0  # 0.5
    assert inpo(b).item() == pytest.approx((h - eta / 2) ** 2)  # 2.25
    # d loss / d log pi(y_w) = 2 (h - eta/2) = -3: the chosen side is pushed up, the rejected one down.
    inpo(b).sum().backward()
    assert b.policy_chosen_logps.grad.item() == pytest.approx(-3.0) and b.policy_rejected_logps.grad.item() == pytest.approx(3.0)


def test_inpo_minimum_and_its_two_references():
    # Zero exactly where the policy's log-ratio margin is eta/2 above the mixture of pi_{r-1}'s and pi_0's.
    eta, tau = 2.0, 0.25  # eta * tau = 1/2
    mix = 0.5 * (-1.0 - -7.0) + 0.5 * (-3.0 - -4.0)  # 3.5
    assert inpo(inpo_batch(mix + eta / 2, 0.0, -3.0, -4.0, -1.0, -7.0, eta, tau)).item() == pytest.approx(0.0, abs=1e-12)
    # tau = 0: the base drops out and only the previous round is the reference.
    assert inpo(inpo_batch(-2.0, -6.0, -3.0, -4.0, -1.0, -7.0, eta, 0.0)).item() == pytest.approx(
        inpo(inpo_batch(-2.0, -6.0, -3.0, -4.0, 50.0, -50.0, eta, 0.0)).item())
    assert inpo(inpo_batch(-2.0, -6.0, -3.0, -4.0, 0.0, 0.0, eta, 0.0)).item() == pytest.approx((4.0 - 1.0 - 1.0) ** 2)
    # eta * tau = 1: the previous round drops out and the base is the only reference.
    assert inpo(inpo_batch(-2.0, -6.0, 9.0, -9.0, -1.0, -7.0, eta, 0.5)).item() == pytest.approx((4.0 - 6.0 - 1.0) ** 2)


def test_inpo_without_base_logps_or_coefficients_is_an_error():
    with pytest.raises(ValueError, match="base_chosen_logps"):
        inpo(batch(-1.0, -2.0, inpo_eta=1.0, inpo_tau=0.1))
    with pytest.raises(ValueError, match="inpo_eta"):
        inpo(batch(-1.0, -2.0, base_chosen_logps=torch.tensor([0.0]), base_rejected_logps=torch.tensor([0.0])))


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_gradients_raise_chosen_and_lower_rejected(name):
    # From a point where the model does not yet prefer the chosen response, every loss pushes the
    # chosen log-prob up and the rejected one down.
    b = batch(-5.0, -5.0, -5.0, -5.0, beta=0.1, **extras())
    loss = LOSSES[name](b).sum()
    loss.backward()
    assert b.policy_chosen_logps.grad.item() < 0, name
    assert b.policy_rejected_logps.grad.item() > 0, name


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_losses_are_per_example_and_finite(name):
    n = 6
    b = PreferenceBatch(torch.randn(n), torch.randn(n), torch.randn(n), torch.randn(n), 0.1,
                        chosen_win_prob=torch.rand(n), rejected_win_prob=torch.rand(n),
                        chosen_lengths=torch.full((n,), 3.0), rejected_lengths=torch.full((n,), 4.0),
                        base_chosen_logps=torch.randn(n), base_rejected_logps=torch.randn(n), inpo_eta=10.0, inpo_tau=0.02)
    out = LOSSES[name](b)
    assert out.shape == (n,) and torch.isfinite(out).all()


def test_sppo_without_win_probs_is_an_error():
    with pytest.raises(ValueError, match="win"):
        sppo(batch(-1.0, -2.0))


def test_implicit_rewards():
    chosen, rejected = implicit_rewards(batch(-1.0, -4.0, -2.0, -3.0, beta=0.5))
    assert chosen.item() == pytest.approx(0.5) and rejected.item() == pytest.approx(-0.5)


def test_chosen_nll_is_per_token_and_raises_the_chosen_response():
    b = batch(-8.0, -3.0, chosen_lengths=torch.tensor([4.0], dtype=torch.float64))
    term = chosen_nll(b)
    assert term.item() == pytest.approx(2.0)
    term.sum().backward()
    assert b.policy_chosen_logps.grad.item() == pytest.approx(-0.25) and b.policy_rejected_logps.grad is None
