"""Every loss against its closed form and the sign of its gradients."""

import math

import pytest
import torch
import torch.nn.functional as F

from models.losses import LOSSES, PreferenceBatch, chosen_nll, dpo_sigmoid, hinge, implicit_rewards, ipo, robust, simpo, sppo


def batch(pc, pr, rc=0.0, rr=0.0, beta=0.1, **kw):
    t = lambda x: torch.tensor([x], dtype=torch.float64, requires_grad=True)  # noqa: E731
    return PreferenceBatch(t(pc), t(pr), torch.tensor([rc], dtype=torch.float64), torch.tensor([rr], dtype=torch.float64),
                           beta, **kw)


def extras():
    return dict(chosen_win_prob=torch.tensor([0.8], dtype=torch.float64), rejected_win_prob=torch.tensor([0.3], dtype=torch.float64),
                chosen_lengths=torch.tensor([4.0], dtype=torch.float64), rejected_lengths=torch.tensor([5.0], dtype=torch.float64))


def test_dpo_sigmoid_equal_logratios_is_ln2():
    assert dpo_sigmoid(batch(-3.0, -5.0, -3.0, -5.0)).item() == pytest.approx(math.log(2))


def test_dpo_sigmoid_closed_form():
    b = batch(-2.0, -6.0, -3.0, -4.0, beta=0.5)
    margin = (-2.0 + 3.0) - (-6.0 + 4.0)  # 3
    assert dpo_sigmoid(b).item() == pytest.approx(math.log1p(math.exp(-0.5 * margin)))


def test_dpo_sigmoid_with_label_smoothing_is_conservative_dpo():
    # cDPO: -(1 - eps) log sigma(beta m) - eps log sigma(-beta m).
    b = batch(-2.0, -6.0, -3.0, -4.0, beta=0.5, label_smoothing=0.1)
    z = 0.5 * 3.0
    expected = -0.9 * math.log(1 / (1 + math.exp(-z))) - 0.1 * math.log(1 / (1 + math.exp(z)))
    assert dpo_sigmoid(b).item() == pytest.approx(expected)
    assert dpo_sigmoid(batch(-3.0, -5.0, -3.0, -5.0, label_smoothing=0.2)).item() == pytest.approx(math.log(2))
    # Its gradient vanishes where sigma(beta m) = 1 - eps: the margin it settles at, log((1 - eps) / eps) / beta.
    at_min = batch(math.log(0.9 / 0.1) / 0.5, 0.0, beta=0.5, label_smoothing=0.1)
    dpo_sigmoid(at_min).sum().backward()
    assert at_min.policy_chosen_logps.grad.abs().item() < 1e-12


def test_ipo_closed_form_uses_per_token_logratios():
    b = batch(-2.0, -6.0, -3.0, -4.0, beta=0.25, chosen_lengths=torch.tensor([2.0]), rejected_lengths=torch.tensor([4.0]))
    margin = (1.0 / 2) - (-2.0 / 4)
    assert ipo(b).item() == pytest.approx((margin - 1 / (2 * 0.25)) ** 2)


def test_hinge_closed_form_and_zero_beyond_margin():
    assert hinge(batch(0.0, 0.0)).item() == pytest.approx(1.0)
    assert hinge(batch(20.0, 0.0, beta=0.1)).item() == 0.0  # beta * margin = 2 > 1


def test_robust_reduces_to_dpo_without_noise_and_matches_formula():
    b = batch(-1.0, -3.0, -2.0, -2.5, beta=0.3)
    assert robust(b).item() == pytest.approx(dpo_sigmoid(b).item())
    b.label_smoothing = 0.2
    z = 0.3 * ((-1.0 + 2.0) - (-3.0 + 2.5))
    expected = (-(0.8) * F.logsigmoid(torch.tensor(z)) + 0.2 * F.logsigmoid(torch.tensor(-z))) / 0.6
    assert robust(b).item() == pytest.approx(expected.item())


def test_sppo_closed_form_and_minimum():
    b = batch(-1.0, -4.0, -2.0, -3.0, beta=0.5, chosen_win_prob=torch.tensor([0.9]), rejected_win_prob=torch.tensor([0.2]))
    eta = 2.0
    expected = ((1.0 - eta * 0.4) ** 2 + (-1.0 - eta * -0.3) ** 2) / 2
    assert sppo(b).item() == pytest.approx(expected)
    # Zero exactly when each log-ratio equals eta * (P - 1/2).
    at_min = batch(-2.0 + 0.8, -3.0 - 0.6, -2.0, -3.0, beta=0.5, chosen_win_prob=torch.tensor([0.9]),
                   rejected_win_prob=torch.tensor([0.2]))
    assert sppo(at_min).item() == pytest.approx(0.0, abs=1e-12)


def test_simpo_is_reference_free_and_closed_form():
    b = batch(-4.0, -10.0, rc=-100.0, rr=50.0, beta=2.0, chosen_lengths=torch.tensor([2.0]), rejected_lengths=torch.tensor([5.0]),
              simpo_gamma=0.5)
    z = 2.0 * (-4.0 / 2) - 2.0 * (-10.0 / 5) - 0.5
    assert simpo(b).item() == pytest.approx(math.log1p(math.exp(-z)))


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
                        chosen_lengths=torch.full((n,), 3.0), rejected_lengths=torch.full((n,), 4.0))
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
