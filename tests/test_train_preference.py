"""The preference losses agree with TRL's DPOTrainer (the test-only reference) on a fixed batch."""

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from vicuna.train.preference import preference_loss

trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer")


def _trl_loss(logps, ref_chosen, ref_rejected, completion_mask, *, beta, loss_type):
    """Run TRL's own DPOTrainer._compute_loss on precomputed per-token log-probs.

    The model is a stand-in returning those log-probs (what TRL's fused LM head returns: zero outside the answer);
    everything from the log-probs to the loss is TRL's code.
    """
    b2, seq = logps.shape
    outputs = SimpleNamespace(log_probs=logps, entropy=torch.zeros(b2, seq), mean_logits=torch.zeros(b2, seq),
                              is_top1=torch.zeros(b2, seq, dtype=torch.bool))
    model = SimpleNamespace(training=True)
    gather = lambda t: t if torch.is_tensor(t) else torch.tensor(t)  # noqa: E731  (one process)
    fake = SimpleNamespace(
        model=model, accelerator=SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=gather, gather=gather),
        aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
        loss_types=[loss_type], loss_weights=[1.0], beta=beta, use_weighting=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1)
    call = lambda **kw: outputs  # noqa: E731
    inputs = {"input_ids": torch.zeros(b2, seq + 1, dtype=torch.long), "attention_mask": torch.ones(b2, seq + 1),
              "completion_mask": completion_mask, "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected}
    loss = trl_dpo.DPOTrainer._compute_loss(fake, call, inputs, False)
    return loss, fake._metrics["train"]


@pytest.mark.parametrize("loss_type,beta", [("sigmoid", 0.1), ("sigmoid", 0.5), ("hinge", 0.1), ("ipo", 0.1),
                                            ("dpo", 0.3)])
def test_loss_and_rewards_match_trl(loss_type, beta):
    g = torch.Generator().manual_seed(0)
    pairs, seq = 4, 9
    completion_mask = torch.zeros(2 * pairs, seq + 1, dtype=torch.long)
    for r, start in enumerate([3, 5, 2, 6, 4, 4, 7, 1]):  # answers of different lengths after the prompt
        completion_mask[r, start:] = 1
    per_token = -torch.rand(2 * pairs, seq, generator=g, dtype=torch.float64) * 3 * completion_mask[:, 1:]
    ref_chosen = -torch.rand(pairs, generator=g, dtype=torch.float64) * 10
    ref_rejected = -torch.rand(pairs, generator=g, dtype=torch.float64) * 10
    want, metrics = _trl_loss(per_token, ref_chosen, ref_rejected, completion_mask, beta=beta,
                              loss_type="sigmoid" if loss_type == "dpo" else loss_type)

    logps = per_token.sum(1)
    tokens = completion_mask.sum(1).double()
    got = preference_loss(logps[:pairs], logps[pairs:], ref_chosen, ref_rejected, beta=beta, loss_type=loss_type,
                          chosen_tokens=tokens[:pairs], rejected_tokens=tokens[pairs:])
    assert abs(got.loss.item() - want.item()) < 1e-5 and want.item() > 0
    m = got.metrics()
    for ours, theirs in (("rewards/chosen", "rewards/chosen"), ("rewards/rejected", "rewards/rejected"),
                         ("rewards/margin", "rewards/margins"), ("rewards/accuracy", "rewards/accuracies")):
        assert abs(m[ours] - metrics[theirs][-1]) < 1e-5, ours


def test_bad_settings_are_refused():
    t = torch.zeros(2)
    with pytest.raises(ValueError, match="beta"):
        preference_loss(t, t, t, t, beta=0)
    with pytest.raises(ValueError, match="unknown preference loss"):
        preference_loss(t, t, t, t, beta=0.1, loss_type="kto")
    with pytest.raises(ValueError, match="token counts"):
        preference_loss(t, t, t, t, beta=0.1, loss_type="ipo")
