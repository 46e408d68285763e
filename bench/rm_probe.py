"""What the helpfulness reward model learnt, beside what the SFT model it starts from already knows.

    .venv/bin/python bench/rm_probe.py runs/demo               # a finished run with sft/ and reward-helpfulness/
    .venv/bin/python bench/rm_probe.py runs/demo --weights 0.1 0.3

On the run's held-out helpfulness pairs (the reward stage's own split: same fraction, cap and seed), accuracy by
rating of:

- ``reward model``: the trained helpfulness RM (``<run>/reward-helpfulness/final``), chosen scored above rejected;
- ``SFT log-likelihood``: no training at all, the SFT model's (``<run>/sft/final``) summed log-probability of each
  answer given its prompt, in the chat format the RM reads;
- ``RM + w x log-likelihood``: the two added, for each ``--weights`` value (the RM's and the log-likelihood's
  differences are of the same order, a few units);
- ``linear probe on SFT states``: a logistic regression on the difference of the SFT model's last-token hidden states
  (last and middle layer), fitted on the reward stage's training pairs of the helpfulness category (L2 0.01): what a
  reward head on the frozen SFT model could read.

Figures for a comparison between ranking methods, not a recipe: the weights are not fitted on anything here, and
choosing one by these held-out figures would be choosing on the test set.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch

from _common import print_table  # noqa: E402  (puts the repository on sys.path)

from llama2_align.chat import encode_dialog  # noqa: E402
from llama2_align.data import RATINGS, read_records  # noqa: E402
from llama2_align.model import build_model  # noqa: E402
from llama2_align.ppo_core import gather_logprobs  # noqa: E402
from llama2_align.stages.reward import RewardScorer, split_heldout  # noqa: E402
from llama2_align.tokenizer import load_tokenizer  # noqa: E402


def _pairs(run: Path):
    result = json.loads((run / "reward-helpfulness" / "result.json").read_text())
    cfg, data = result["config"], result["inputs"]["data"]
    records = read_records(data["path"] if isinstance(data, dict) else data, "preference")
    train, held = split_heldout(records, cfg["heldout_fraction"], cfg["max_heldout_per_category"], cfg["seed"])
    return ([r for r in train if r.category == "helpfulness"], [r for r in held if r.category == "helpfulness"])


@torch.no_grad()
def _sft_features(model, tokenizer, records, answer: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per record: the answer's summed log-probability, and the last token's hidden states (last and middle layer)."""
    lls, states = [], []
    for r in records:
        enc = encode_dialog(tokenizer, r.context_messages() + [{"role": "assistant", "content": getattr(r, answer)}])
        ids = torch.tensor([enc.input_ids])
        out = model(ids, output_hidden_states=True)
        mask = torch.tensor(enc.answer_mask[1:], dtype=torch.bool)
        lls.append(gather_logprobs(out.logits[0, :-1].float(), ids[0, 1:])[mask].sum())
        hs = out.hidden_states
        states.append(torch.cat([hs[-1][0, -1], hs[len(hs) // 2][0, -1]]).float())
    return torch.stack(lls), torch.stack(states)


def _fit_probe(x: torch.Tensor, l2: float = 0.01) -> torch.Tensor:
    w = torch.zeros(x.shape[1], requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=500)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.softplus(-(x @ w)).mean() + l2 * (w ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach()


def _row(name: str, records, margins: torch.Tensor) -> list:
    by = defaultdict(list)
    for r, m in zip(records, margins.tolist()):
        by[r.rating].append(m > 0)
    return [name] + [f"{sum(v) / len(v):.3f}" if (v := by.get(rt)) else "n/a" for rt in RATINGS]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--weights", type=float, nargs="*", default=[0.1, 0.3])
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    train, held = _pairs(args.run)
    scorer = RewardScorer(args.run / "reward-helpfulness" / "final", device="cpu", batch_size=64)
    rm = (scorer.score([r.context_messages() for r in held], [r.chosen for r in held])
          - scorer.score([r.context_messages() for r in held], [r.rejected for r in held]))
    sft = args.run / "sft" / "final"
    tokenizer = load_tokenizer(sft)
    model = build_model(sft, "policy", device="cpu").eval()
    ll_c, h_c = _sft_features(model, tokenizer, held, "chosen")
    ll_r, h_r = _sft_features(model, tokenizer, held, "rejected")
    _, t_c = _sft_features(model, tokenizer, train, "chosen")
    _, t_r = _sft_features(model, tokenizer, train, "rejected")
    probe = _fit_probe(t_c - t_r)
    counts = {rt: sum(r.rating == rt for r in held) for rt in RATINGS}
    rows = [_row("reward model", held, rm), _row("SFT log-likelihood", held, ll_c - ll_r)]
    rows += [_row(f"RM + {w} x log-likelihood", held, rm + w * (ll_c - ll_r)) for w in args.weights]
    rows.append(_row("linear probe on SFT states", held, (h_c - h_r) @ probe))
    print_table(f"held-out helpfulness pairs of {args.run} (pairs: "
                + ", ".join(f"{rt} {n}" for rt, n in counts.items()) + f"; probe fitted on {len(train)})",
                ["ranking"] + list(RATINGS), rows)


if __name__ == "__main__":
    main()
