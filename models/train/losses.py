"""DPO-family losses as pure functions of summed log-prob tensors.

Every function takes a `PreferenceBatch` of per-example tensors and returns per-example losses (the
trainer takes the mean). Log-ratios are h_w = log pi(y_w|x) - log pi_ref(y_w|x) for the chosen
response and h_l likewise for the rejected one; all sums are over response tokens.

One explicit table, LOSSES, maps the recipe's `training.loss` name to its function; no registry.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class PreferenceBatch:
    policy_chosen_logps: torch.Tensor
    policy_rejected_logps: torch.Tensor
    ref_chosen_logps: torch.Tensor
    ref_rejected_logps: torch.Tensor
    beta: float
    chosen_win_prob: torch.Tensor | None = None  # SPPO: P(y_w beats pi_t), mean over the K samples
    rejected_win_prob: torch.Tensor | None = None
    chosen_lengths: torch.Tensor | None = None  # SimPO: response tokens
    rejected_lengths: torch.Tensor | None = None
    label_smoothing: float = 0.0  # cDPO / robust DPO: assumed probability that a label is flipped
    simpo_gamma: float = 0.5
    # INPO: log-probs under the base model pi_0 (the ref_* fields hold the previous round's pi_{r-1}),
    # and its eta and tau (configs/recipe.py, Recipe.inpo_eta_tau, says where their defaults come from).
    base_chosen_logps: torch.Tensor | None = None
    base_rejected_logps: torch.Tensor | None = None
    inpo_eta: float | None = None
    inpo_tau: float | None = None

    @property
    def chosen_logratios(self) -> torch.Tensor:
        return self.policy_chosen_logps - self.ref_chosen_logps

    @property
    def rejected_logratios(self) -> torch.Tensor:
        return self.policy_rejected_logps - self.ref_rejected_logps

    @property
    def margin(self) -> torch.Tensor:
        """h_w - h_l: the argument every pairwise DPO-style loss is a function of."""
        return self.chosen_logratios - self.rejected_logratios


def dpo_sigmoid(batch: PreferenceBatch) -> torch.Tensor:
    # DPO, Rafailov et al. 2023, Eq. 7: -log sigma(beta * (h_w - h_l)).
    # SPIN, Chen et al. 2024, Eq. 4.7 with the logistic loss is the same expression with y_w the
    # ground truth and y_l the previous iterate's sample.
    # With label_smoothing eps > 0 it is conservative DPO (cDPO; E. Mitchell 2023, "A note on DPO with
    # noisy preferences & relationship to IPO"; TRL's sigmoid loss with label_smoothing, e.g. v0.10):
    # each label is taken to be flipped with probability eps, i.e. binary cross-entropy against the
    # soft target 1 - eps: -(1 - eps) log sigma(beta m) - eps log sigma(-beta m), m = h_w - h_l.
    # Its minimum is at sigma(beta m) = 1 - eps, so the margin stops growing instead of running off.
    logits = batch.beta * batch.margin
    eps = batch.label_smoothing
    if eps == 0:
        return -F.logsigmoid(logits)
    return -(1 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits)


def ipo(batch: PreferenceBatch) -> torch.Tensor:
    # IPO, Azar et al. 2023, Eq. 17: (h_w - h_l - 1/(2 tau))^2 with tau = beta. The paper's
    # log-likelihoods are per token, as in its reference code, so we average over response tokens.
    if batch.chosen_lengths is None or batch.rejected_lengths is None:
        raise ValueError("ipo needs chosen_lengths and rejected_lengths (it uses per-token log-ratios)")
    margin = batch.chosen_logratios / batch.chosen_lengths - batch.rejected_logratios / batch.rejected_lengths
    return (margin - 1 / (2 * batch.beta)) ** 2


def hinge(batch: PreferenceBatch) -> torch.Tensor:
    # SLiC-HF, Zhao et al. 2023, arXiv:2305.10425, Eq. 1 (its calibration hinge, delta = 1) on the log-ratios
    # as in Liu et al. 2024 (RSO): max(0, 1 - beta * (h_w - h_l)).
    return torch.relu(1 - batch.beta * batch.margin)


def robust(batch: PreferenceBatch) -> torch.Tensor:
    # Robust DPO (rDPO), Chowdhury et al. 2024, arXiv:2403.00409, its de-biased loss (the equation
    # number differs between the paper's versions): unbiased under labels flipped with rate eps,
    # [-(1 - eps) log sigma(beta m) + eps log sigma(-beta m)] / (1 - 2 eps), m = h_w - h_l.
    eps = batch.label_smoothing
    if not 0 <= eps < 0.5:
        raise ValueError(f"robust loss needs 0 <= label_smoothing < 0.5, got {eps}")
    logits = batch.beta * batch.margin
    return (-(1 - eps) * F.logsigmoid(logits) + eps * F.logsigmoid(-logits)) / (1 - 2 * eps)


def sppo(batch: PreferenceBatch) -> torch.Tensor:
    # SPPO, Wu et al. 2024, Eq. 4.7 (Algorithm 1), as in uclaml/SPPO's trainer: each log-ratio is
    # regressed on eta * (P(y beats pi_t) - 1/2) with eta = 1/beta, then the two squares are averaged.
    if batch.chosen_win_prob is None or batch.rejected_win_prob is None:
        raise ValueError("sppo needs chosen_win_prob and rejected_win_prob (the judge's win probabilities)")
    eta = 1.0 / batch.beta
    chosen_term = (batch.chosen_logratios - eta * (batch.chosen_win_prob - 0.5)) ** 2
    rejected_term = (batch.rejected_logratios - eta * (batch.rejected_win_prob - 0.5)) ** 2
    return (chosen_term + rejected_term) / 2


def simpo(batch: PreferenceBatch) -> torch.Tensor:
    # SimPO, Meng et al. 2024, Eq. 6: reference-free, length-normalised:
    # -log sigma(beta/|y_w| log pi(y_w) - beta/|y_l| log pi(y_l) - gamma).
    if batch.chosen_lengths is None or batch.rejected_lengths is None:
        raise ValueError("simpo needs chosen_lengths and rejected_lengths")
    chosen_reward = batch.beta * batch.policy_chosen_logps / batch.chosen_lengths
    rejected_reward = batch.beta * batch.policy_rejected_logps / batch.rejected_lengths
    return -F.logsigmoid(chosen_reward - rejected_reward - batch.simpo_gamma)


def inpo(batch: PreferenceBatch) -> torch.Tensor:
    # INPO, Zhang et al. 2024, arXiv:2407.00617, Sec. 4: the loss L_t(pi) that each iteration of its
    # Algorithm 1 minimises instead of estimating win rates (the equation number was not checked
    # against the paper's text; the formula is checked against its derivation below and against the
    # authors' released trainer):
    #   h_t(pi, y, y') = log pi(y)/pi(y') - eta*tau log pi_0(y)/pi_0(y') - (1 - eta*tau) log pi_t(y)/pi_t(y')
    #   L_t(pi) = E[(h_t(pi, y_w, y_l) - eta/2)^2]
    # Why eta/2: online mirror descent with KL to pi_0 steps to
    #   pi_{t+1} ∝ pi_t^{1 - eta tau} pi_0^{eta tau} exp(eta P(y > pi_t)),
    # so h_t(pi_{t+1}, y, y') = eta (P(y > pi_t) - P(y' > pi_t)); replacing those win rates by the
    # sampled preference and folding the two orders of a pair together (as IPO does) leaves the target
    # eta/2 for the winner's side. pi_t is the previous round (ref_*), pi_0 the base (base_*); log-probs
    # are sums over the response's tokens, as in the authors' trainer.
    if batch.base_chosen_logps is None or batch.base_rejected_logps is None:
        raise ValueError("inpo needs base_chosen_logps and base_rejected_logps (log-probs under the base model)")
    if batch.inpo_eta is None or batch.inpo_tau is None:
        raise ValueError("inpo needs inpo_eta and inpo_tau")
    eta, eta_tau = batch.inpo_eta, batch.inpo_eta * batch.inpo_tau
    policy = batch.policy_chosen_logps - batch.policy_rejected_logps
    base = batch.base_chosen_logps - batch.base_rejected_logps
    previous = batch.ref_chosen_logps - batch.ref_rejected_logps
    h = policy - eta_tau * base - (1 - eta_tau) * previous
    return (h - eta / 2) ** 2


LOSSES = {
    "dpo_sigmoid": dpo_sigmoid,
    "ipo": ipo,
    "hinge": hinge,
    "robust": robust,
    "sppo": sppo,
    "simpo": simpo,
    "inpo": inpo,
}
# Losses that need log-probs under the base model pi_0 besides the previous round's (the trainer
# computes them only for these).
NEEDS_BASE_LOGPS = frozenset({"inpo"})


def chosen_nll(batch: PreferenceBatch) -> torch.Tensor:
    # Iterative RPO, Pang et al. 2024, Eq. 1: the DPO loss plus alpha times the length-normalised
    # negative log-likelihood of the chosen response, -log pi(y_w|x) / |y_w|. Without it DPO-family
    # losses can lower the chosen response's likelihood too, which breaks greedy answers on
    # verifiable tasks; the trainer adds it with weight `training.nll_weight`.
    if batch.chosen_lengths is None:
        raise ValueError("chosen_nll needs chosen_lengths")
    return -batch.policy_chosen_logps / batch.chosen_lengths


def completion_nll(policy_logps: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Per-example losses whose mean over the batch is the negative log-likelihood per response token:
    -sum_i log pi(y_i|x_i) / sum_i |y_i|, from each example's summed log-prob and its token count.

    The self-training family fits the samples that pass the judge by their likelihood alone (no reference,
    no rejected side):
    - ReST, Gulcehre et al. 2023, arXiv:2308.08998: its NLL loss -E[sum_t log pi(y_t | y_<t, x)] (Sec. 2, Eq. 1),
      minimised in each Improve step (Sec. 3) on the Grow step's samples that pass the filter
      F(x, y; tau) = 1[R(x, y) > tau], with tau rising from one Improve step to the next;
    - ReST-EM, Singh et al. 2023, arXiv:2312.06585, Sec. 3: the M-step maximises
      J(theta) = E_(x,y)~D_i [r(x, y) log p_theta(y|x)], with r binary: the log-likelihood of the samples that pass;
    - STaR, Zelikman et al. 2022, arXiv:2203.14465, Sec. 3.1: the gradient sum_i E[1(y_hat_i = y_i) grad log
      p_M(y_hat_i, r_hat_i | x_i)] is that of the same filtered log-likelihood (its rationalizations of Sec.
      3.2 join the set as if sampled without the hint).
    (Section and equation numbers are those of the arXiv versions, not re-checked against the text.)
    Dividing by the batch's response tokens rather than the number of examples is the supervised convention
    (models/train/sft.py): the papers' sum over tokens up to a constant per batch, so long and short answers weigh
    by their tokens.
    """
    return -policy_logps * policy_logps.numel() / lengths.sum()


def implicit_rewards(batch: PreferenceBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """beta * log-ratio of chosen and rejected (DPO's implicit reward, Rafailov et al. 2023, Eq. 5)."""
    return batch.beta * batch.chosen_logratios.detach(), batch.beta * batch.rejected_logratios.detach()
