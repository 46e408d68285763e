"""The rounds' reward-model retraining at other learning rates, offline, on a finished rounds run's own pairs.

For each round r of ``RUN`` (a directory written by ``llama2-align rounds``), the RM of one kind is retrained as the
round retrains it (the round's recorded reward-stage config: warm-started from the previous round's RM, one epoch
over every training pair so far, ``rounds/<r>/preferences.jsonl``) but with ``learning_rate`` set to each ``--lr``,
the chain going on from that learning rate's own retrained RM. Each retrained RM and the one it started from are
scored on the round's test pairs (``rounds/<r>/test_pairs.jsonl``, never trained on), as the rounds report's
staleness table does (``rounds.rm_accuracy``, ``rounds.accuracy_change``: the change with its 95% paired-bootstrap
interval, on all pairs and on the decisive ones). The round's own learning rate reproduces the report's figures.
The later rounds' pairs are the recorded run's (they came from the policy its RMs shaped), so a learning rate is
judged here on the same pairs as the recipe, not end to end.

    python bench/rm_warm_start.py runs/rounds --kind safety --lr 1e-3 1e-4 [--out runs/rm-warm-start]

~20-30 s a retrain of the demo's RMs on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from _common import print_table  # noqa: E402  (puts the repository on sys.path)


def _rounds(run: Path) -> list[int]:
    d = run / "rounds"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit() and int(p.name) > 0
                  and (p / "round.json").exists())


def _accuracy(entry: dict) -> str:
    dec = entry.get("accuracy_decisive")
    return f"{entry['accuracy']:.3f}" + (f" [{dec:.3f}]" if dec is not None else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="a finished rounds run directory (runs/<name>)")
    ap.add_argument("--kind", choices=["helpfulness", "safety"], default="safety")
    ap.add_argument("--lr", type=float, nargs="+", required=True, help="learning rates of the warm-started retrain")
    ap.add_argument("--out", type=Path, default=None, help="where the retrained RMs go (default RUN-rm-warm-start)")
    args = ap.parse_args()

    from llama2_align.rounds import accuracy_change, rm_accuracy
    from llama2_align.stages.reward import RewardConfig, RewardInputs, run_reward

    run, kind = args.run.resolve(), args.kind
    out = (args.out or run.with_name(run.name + "-rm-warm-start")).resolve()
    rounds = _rounds(run)
    if not rounds:
        raise SystemExit(f"{run}: no finished round (rounds/<r>/round.json)")
    rows = []
    for lr in args.lr:
        prev = str(run / f"reward-{kind}" / "final")  # round 0's RM
        for r in rounds:
            rd = run / "rounds" / str(r)
            recorded = json.loads((rd / f"reward-{kind}" / "result.json").read_text())
            cfg = {**recorded["config"], "learning_rate": lr}
            o = out / f"lr{lr:g}" / str(r)
            res = run_reward(RewardConfig.model_validate(cfg),
                             RewardInputs(sft_model=str(run / "sft" / "final"), data=str(rd / "preferences.jsonl"),
                                          init=prev), o / f"reward-{kind}")
            before = rm_accuracy({kind: prev}, rd / "test_pairs.jsonl", o / f"before-{kind}.json")[kind]
            after = rm_accuracy({kind: res.final}, rd / "test_pairs.jsonl", o / f"after-{kind}.json")[kind]
            prev = res.final
            if not before.get("pairs"):
                rows.append([f"{lr:g}", r, 0, "-", "-", "-", "-"])  # no test pair of this kind in the round
                continue
            ch, chd = accuracy_change(before, after), accuracy_change(before, after, decisive_only=True)
            dec = f"{chd['change']:+.3f} [{chd['ci'][0]:+.3f}, {chd['ci'][1]:+.3f}]" if chd else "-"
            change = f"{ch['change']:+.3f} [{ch['ci'][0]:+.3f}, {ch['ci'][1]:+.3f}] {ch['verdict']}"
            rows.append([f"{lr:g}", r, before["pairs"], _accuracy(before), _accuracy(after), change, dec])
    print_table(f"the {kind} RM's warm start in the rounds of {run} (test pairs; in brackets, the decisive ones)",
                ["lr", "round", "pairs", "previous RM", "retrained RM", "retrained - previous (95% CI)",
                 "on decisive pairs"], rows)


if __name__ == "__main__":
    main()
