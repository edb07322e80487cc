"""Preference-optimisation losses on sequence log-probabilities (DPO and its variants).

Each loss compares how much the policy raised the log-probability of the chosen answer over the reference's
(``log pi(y_w|x) - log ref(y_w|x)``) with the same for the rejected answer.  Log-probabilities are sums over the
answer's tokens only (the prompt is never scored), so a caller computes them with the SFT masks.

- ``sigmoid`` (DPO, Rafailov et al. 2023): ``-log sigmoid(beta * (r_w - r_l))``;
- ``hinge`` (SLiC): ``relu(1 - beta * (r_w - r_l))``;
- ``ipo`` (Azar et al. 2023): ``((r_w / n_w - r_l / n_l) - 1 / (2 beta))**2``, per-token averaged log ratios (as
  TRL does) so that beta means the same at any answer length.

``tests/test_train_preference.py`` checks these against TRL's DPOTrainer to 1e-5.  Written here rather than
imported because TRL computes the loss inside its trainer's forward pass (no standalone function to call, and
TRL is not a runtime dependency); the formulas are a few lines.
"""

from __future__ import annotations

from dataclasses import dataclass

LOSSES = ("sigmoid", "ipo", "hinge")


@dataclass
class PreferenceOutput:
    loss: object  # scalar tensor: mean over pairs
    chosen_rewards: object  # beta * (policy - reference) log-prob of each chosen answer, detached
    rejected_rewards: object

    def metrics(self) -> dict[str, float]:
        """What is logged per step: rewards, their margin and the share of pairs ranked right."""
        margin = self.chosen_rewards - self.rejected_rewards
        return {"rewards/chosen": self.chosen_rewards.mean().item(),
                "rewards/rejected": self.rejected_rewards.mean().item(),
                "rewards/margin": margin.mean().item(),
                "rewards/accuracy": (margin > 0).float().mean().item()}


def preference_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, *, beta: float,
                    loss_type: str = "sigmoid", chosen_tokens=None, rejected_tokens=None) -> PreferenceOutput:
    """The loss of one batch of pairs from summed answer log-probs (1-D tensors, one entry per pair).

    ``chosen_tokens`` / ``rejected_tokens`` (answer lengths in tokens) are needed by ``ipo`` only.
    """
    import torch.nn.functional as F

    if loss_type == "dpo":
        loss_type = "sigmoid"
    if beta <= 0:
        raise ValueError(f"beta must be > 0, not {beta}")
    chosen_ratio, rejected_ratio = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    delta = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        per_pair = -F.logsigmoid(beta * delta)
    elif loss_type == "hinge":
        per_pair = F.relu(1 - beta * delta)
    elif loss_type == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("ipo needs the answers' token counts")
        ipo_delta = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        per_pair = (ipo_delta - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown preference loss {loss_type!r}; one of {', '.join(LOSSES)}")
    return PreferenceOutput(per_pair.mean(), beta * chosen_ratio.detach(), beta * rejected_ratio.detach())
