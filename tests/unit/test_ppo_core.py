"""PPO maths checked against numbers worked out by hand (written out in the comments)."""

from __future__ import annotations

import math

import pytest
import torch

from llama2_align import ppo_core as core

torch.set_num_threads(1)


def close(a, b, tol=1e-5):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32),
                          atol=tol, rtol=0)


# ---------------------------------------------------------------------------------------------------- GAE


def test_gae_hand_worked_gamma1_lambda095_with_padded_row():
    # Row 0: three real tokens. Row 1: two real tokens and one pad (its value 9.9 and reward 7 must be ignored).
    rewards = torch.tensor([[0.1, -0.2, 1.0], [0.2, 0.5, 7.0]])
    values = torch.tensor([[0.5, 0.4, 0.3], [0.1, 0.2, 9.9]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    adv, ret = core.gae(rewards * mask, values, mask, gamma=1.0, lam=0.95)
    # Row 0 (value after the last token is 0):
    #   t=2: δ = 1.0 + 0   - 0.3 = 0.7                       A2 = 0.7
    #   t=1: δ = -0.2 + 0.3 - 0.4 = -0.3                     A1 = -0.3 + 0.95·0.7   = 0.365
    #   t=0: δ = 0.1 + 0.4 - 0.5 = 0.0                       A0 = 0.0  + 0.95·0.365 = 0.34675
    # Row 1 (t=2 is padding: A2 = 0, and V(pad) does not leak into t=1):
    #   t=1: δ = 0.5 + 0   - 0.2 = 0.3                       A1 = 0.3
    #   t=0: δ = 0.2 + 0.2 - 0.1 = 0.3                       A0 = 0.3 + 0.95·0.3 = 0.585
    assert close(adv, [[0.34675, 0.365, 0.7], [0.585, 0.3, 0.0]])
    # returns = A + V on real tokens, 0 on padding
    assert close(ret, [[0.84675, 0.765, 1.0], [0.685, 0.5, 0.0]])


def test_gae_lambda1_gives_monte_carlo_returns():
    rewards = torch.tensor([[1.0, 2.0, 3.0]])
    values = torch.tensor([[0.5, -1.0, 2.0]])
    mask = torch.ones(1, 3)
    _, ret = core.gae(rewards, values, mask, gamma=1.0, lam=1.0)
    assert close(ret, [[6.0, 5.0, 3.0]])  # reward-to-go, whatever the values


# ---------------------------------------------------------------------------------------------------- reward


def test_combine_rewards_piecewise_gate():
    sig = torch.sigmoid
    rh = torch.tensor([2.0, 2.0, 2.0, 2.0])
    rs = torch.tensor([0.0, -3.0, 1.0, -1.0])  # sigmoid: 0.5, 0.0474, 0.731, 0.269
    is_safety = torch.tensor([True, False, False, False])
    rc = core.combine_rewards(rh, rs, is_safety, safety_threshold=0.15)
    # row 0: safety prompt -> Rs (even though Rh is higher)
    # row 1: Rs = 0.047 < 0.15 -> Rs (unsafe answer to a helpful prompt)
    # row 2: Rs = 0.73 >= 0.15, helpful prompt -> Rh
    # row 3: Rs = 0.27 >= 0.15 -> Rh
    assert close(rc, [0.5, float(sig(torch.tensor(-3.0))), float(sig(torch.tensor(2.0))),
                      float(sig(torch.tensor(2.0)))])
    assert close(rc[1], 0.0474259)
    assert close(rc[2], 0.8807971)
    # piecewise off: Rh everywhere
    flat = core.combine_rewards(rh, rs, is_safety, piecewise=False)
    assert close(flat, [0.8807971] * 4)


def test_combine_rewards_threshold_is_strict():
    rs_raw = torch.logit(torch.tensor([0.15, 0.1499]))
    rc = core.combine_rewards(torch.tensor([3.0, 3.0]), rs_raw, torch.tensor([False, False]), 0.15)
    assert close(rc[0], float(torch.sigmoid(torch.tensor(3.0))), 1e-4)  # Rs == 0.15 is not "< 0.15"
    assert close(rc[1], 0.1499, 1e-4)


def test_logit_inverts_sigmoid_and_clamps():
    x = torch.tensor([-4.0, -0.5, 0.0, 3.0])
    assert close(core.logit(torch.sigmoid(x)), x, 1e-4)
    assert torch.isfinite(core.logit(torch.tensor([0.0, 1.0]))).all()


def test_final_scores_logit_whitening():
    rc = torch.tensor([0.1, 0.5, 0.9, 0.7])
    s = core.final_scores(rc)
    # logit: -2.1972, 0, 2.1972, 0.8473; whitened over the batch
    assert abs(float(s.mean())) < 1e-6
    assert abs(float(s.std(unbiased=False)) - 1.0) < 1e-4
    assert torch.equal(torch.argsort(s), torch.argsort(rc))  # monotone
    three = core.final_scores(torch.tensor([0.1, 0.5, 0.9]))
    assert close(three, [-1.2247449, 0.0, 1.2247449])  # ±2.1972 / (2.1972·sqrt(2/3))
    assert close(core.final_scores(rc, use_logit=False, use_whiten=False), rc)
    assert close(core.final_scores(rc, use_whiten=False), core.logit(rc))
    assert close(core.final_scores(torch.tensor([0.7])), core.logit(torch.tensor([0.7])))  # one sample: no whitening


def test_token_rewards_kl_on_every_token_score_on_last():
    score = torch.tensor([1.0, 2.0])
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0]])
    ref = torch.tensor([[-1.5, -2.0, -2.0], [-2.0, -0.5, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    rewards, kl = core.token_rewards(score, logp, ref, mask, kl_beta=0.1)
    # kl = (logp - ref)·mask = [[0.5, 0, -1], [1, -0.5, 0]]
    assert close(kl, [[0.5, 0.0, -1.0], [1.0, -0.5, 0.0]])
    # -β·kl everywhere, + score on the last REAL token (index 2 and index 1), 0 on padding
    assert close(rewards, [[-0.05, 0.0, 0.1 + 1.0], [-0.1, 0.05 + 2.0, 0.0]])
    # β = 0: only the score remains
    r0, _ = core.token_rewards(score, logp, ref, mask, kl_beta=0.0)
    assert close(r0, [[0, 0, 1.0], [0, 2.0, 0]])


# ---------------------------------------------------------------------------------------------------- losses


def test_policy_loss_clipping_hand_worked():
    # four real tokens and one pad; ε = 0.2
    ratio = torch.tensor([[1.5, 0.5, 1.1, 0.5, 3.0]])
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])
    old = torch.zeros_like(ratio)
    new = torch.log(ratio).requires_grad_(True)
    loss, stats = core.policy_loss(new, old, adv, mask, clip_range=0.2)
    # token 0: r=1.5, A=+1: max(-1.5, -1.2) = -1.2  (clipped: no extra credit for moving further)
    # token 1: r=0.5, A=+1: max(-0.5, -0.8) = -0.5  (unclipped: the pessimistic side)
    # token 2: r=1.1, A=-1: max( 1.1,  1.1) =  1.1  (inside the band)
    # token 3: r=0.5, A=-1: max( 0.5,  0.8) =  0.8  (clipped)
    # mean = (-1.2 - 0.5 + 1.1 + 0.8) / 4 = 0.05; the pad (r=3, A=5) is ignored
    assert close(loss, 0.05)
    assert stats["clip_frac"] == pytest.approx(0.5)
    loss.backward()
    g = new.grad[0]
    assert g[0] == 0 and g[3] == 0 and g[4] == 0  # clipped tokens and padding carry no gradient
    assert close(g[1], -0.5 / 4) and close(g[2], 1.1 / 4)  # d/dlogp of -A·r / n = -A·r / n
    # approx_kl (k3) = mean(r - 1 - log r) over real tokens, >= 0
    k3 = sum(r - 1 - math.log(r) for r in (1.5, 0.5, 1.1, 0.5)) / 4
    assert stats["approx_kl"] == pytest.approx(k3, abs=1e-5)


def test_policy_loss_at_ratio_one_is_minus_mean_advantage():
    adv = torch.tensor([[1.0, -3.0, 2.0]])
    lp = torch.tensor([[-1.0, -2.0, -0.5]])
    loss, stats = core.policy_loss(lp, lp, adv, torch.ones(1, 3))
    assert close(loss, 0.0) and stats["clip_frac"] == 0.0 and stats["approx_kl"] == pytest.approx(0.0)


def test_value_loss_clipping_hand_worked():
    values = torch.tensor([[1.0, 0.0, 1.5, 42.0]])
    old = torch.tensor([[0.5, 0.5, 1.0, 0.0]])
    returns = torch.tensor([[0.0, 1.0, 2.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    loss, stats = core.value_loss(values, old, returns, mask, clip_range=0.2)
    # t0: (1-0)² = 1;    clip: 0.5+0.2 = 0.7 -> 0.49;  max 1
    # t1: (0-1)² = 1;    clip: 0.5-0.2 = 0.3 -> 0.49;  max 1
    # t2: (1.5-2)² = .25; clip: 1.0+0.2 = 1.2 -> 0.64; max 0.64 (clipped counts)
    # loss = 0.5 · (1 + 1 + 0.64) / 3 = 0.44; pad ignored
    assert close(loss, 0.44)
    assert stats["value_clip_frac"] == pytest.approx(1 / 3)
    unclipped, st = core.value_loss(values, old, returns, mask, clip_range=None)
    assert close(unclipped, 0.5 * (1 + 1 + 0.25) / 3) and st["value_clip_frac"] == 0.0


# ---------------------------------------------------------------------------------------------------- helpers


def test_whiten_with_mask_ignores_padding():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    # mean 2, var 2/3 over the three real entries
    assert close(core.whiten(x, mask), [[-1.2247449, 0.0, 1.2247449, 0.0]])
    assert close(core.whiten(x, mask, shift_mean=False), [[2 - 1.2247449, 2.0, 2 + 1.2247449, 0.0]])
    assert close(core.masked_mean(x, mask), 2.0)
    assert close(core.masked_var(x, mask), 2 / 3)
    w = core.whiten(torch.tensor([3.0, 1.0, 2.0, 6.0]))
    assert abs(float(w.mean())) < 1e-6 and abs(float(w.std(unbiased=False)) - 1) < 1e-4


def test_explained_variance():
    ret = torch.tensor([[1.0, 2.0, 3.0, 4.0, 99.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])
    assert core.explained_variance(ret, ret, mask) == pytest.approx(1.0)
    assert core.explained_variance(torch.full_like(ret, 2.5), ret, mask) == pytest.approx(0.0)
    # values = returns + 0.5 on odd tokens: var(err) = 1/16 ... hand: err = [0, .5, 0, .5] -> var 0.0625;
    # var(returns) = 1.25 -> 1 - 0.05 = 0.95
    v = ret + torch.tensor([[0.0, 0.5, 0.0, 0.5, -50.0]])
    assert core.explained_variance(v, ret, mask) == pytest.approx(0.95)
    assert math.isnan(core.explained_variance(ret, torch.ones_like(ret), mask))


def test_gather_logprobs_and_entropy():
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0]]])
    assert close(core.gather_logprobs(logits, torch.tensor([[2]])), [[-math.log(4)]])
    assert close(core.entropy_from_logits(logits), [[math.log(4)]])
