"""Reward models: helpfulness and safety, each a scalar head on the SFT checkpoint (Llama 2 recipe, §3.2.2).

Loss ``-log σ(r(x, y_c) - r(x, y_r) - m(rating))`` with the paper's small or large margin table (or none); TRL's
``RewardTrainer`` does the training from pre-tokenized ``chosen_ids`` / ``rejected_ids`` / ``margin`` columns, so
the chat rendering is exactly the one the scorer uses at PPO and evaluation time.

Data mixing (paper): the helpfulness RM trains on all helpfulness pairs plus an equal number of safety pairs; the
safety RM trains on safety pairs with helpfulness pairs mixed in as 10% of its data. Held-out pairs of both
categories are split off first (before mixing), so the metrics have the layout of the paper's Table 8.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field

from .. import dist
from ..chat import encode_dialog, prompt_messages
from ..data import RATINGS, PreferenceRecord, read_records
from ..device import no_grad, resolve_dtype
from ..errors import InputError
from ..io import atomic_write_json, read_jsonl
from ..tokenizer import load_tokenizer
from .common import FINAL_DIR, METRICS_FILE, StageOutput, StageRun, logged_losses, stage
from .training import TrainStageConfig, make_trainer, train, trainer_arguments

if TYPE_CHECKING:
    import torch

RM_KINDS = ("helpfulness", "safety")

# m(rating), significantly better -> negligibly better (paper, Table 27).
MARGINS: dict[str, dict[str, float]] = {
    "none": {r: 0.0 for r in RATINGS},
    "small": dict(zip(RATINGS, (1.0, 2.0 / 3.0, 1.0 / 3.0, 0.0))),
    "large": dict(zip(RATINGS, (3.0, 2.0, 1.0, 0.0))),
}


class RewardConfig(TrainStageConfig):
    kind: Literal["helpfulness", "safety"] = "helpfulness"
    margin: Literal["none", "small", "large"] = "small"
    learning_rate: float = Field(1e-5, gt=0)
    lr_scheduler: Literal["cosine", "linear", "constant", "cosine_with_min_lr"] = "cosine_with_min_lr"
    min_lr_ratio: float = 0.1
    min_warmup_steps: int = 5
    epochs: float = 1.0
    batch_size: int = 512
    micro_batch_size: int = 8
    heldout_fraction: float = Field(0.1, ge=0, lt=1)
    max_heldout_per_category: int = Field(1000, ge=0)
    # helpfulness RM: safety pairs added per helpfulness pair (paper: an equal amount).
    safety_pairs_per_helpfulness_pair: float = Field(1.0, ge=0)
    # safety RM: share of helpfulness pairs in its training mix (paper: 10%).
    helpfulness_share_in_safety: float = Field(0.1, ge=0, lt=1)
    unsafe_threshold: float = Field(0.5, gt=0, lt=1)
    score_batch_size: int = Field(64, ge=1)


class RewardInputs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sft_model: str  # the SFT checkpoint (its tokenizer is used)
    data: str | list[str]  # preference pairs of both categories, in one file or several
    data_format: Literal["auto", "native", "hh-rlhf", "pku-saferlhf"] = "auto"
    # A reward model to start from instead of the SFT checkpoint (its score head included): iterative rounds
    # warm-start each round's reward models from the previous round's.
    init: str | None = None


def read_preferences(paths: str | list[str], data_format: str = "auto") -> list[PreferenceRecord]:
    """The preference pairs of one file or of several, in order (each file's format detected on its own)."""
    return [r for path in ([paths] if isinstance(paths, str) else paths)
            for r in read_records(path, "preference", format=data_format)]


def margin_for(rating: str, table: str) -> float:
    return MARGINS[table][rating]


def split_heldout(records: Sequence[PreferenceRecord], fraction: float, cap: int, seed: int):
    """Hold out a fraction of each category (before any mixing), deterministically."""
    by_cat: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        by_cat[r.category].append(i)
    held: set[int] = set()
    rng = random.Random(seed)
    for cat in sorted(by_cat):
        idx = by_cat[cat][:]
        rng.shuffle(idx)
        n = min(cap, int(round(len(idx) * fraction)))
        held.update(idx[:n])
    train = [r for i, r in enumerate(records) if i not in held]
    heldout = [r for i, r in enumerate(records) if i in held]
    return train, heldout


def mix_training_pairs(records: Sequence[PreferenceRecord], config: RewardConfig) -> list[PreferenceRecord]:
    """The paper's mixing: see the module docstring. Sampling is without replacement when possible."""
    rng = random.Random(config.seed)
    helpful = [r for r in records if r.category == "helpfulness"]
    safety = [r for r in records if r.category == "safety"]

    def take(pool, n):
        n = int(n)
        if n <= len(pool):
            return rng.sample(pool, n)
        return pool + [rng.choice(pool) for _ in range(n - len(pool))] if pool else []

    if config.kind == "helpfulness":
        mixed = helpful + take(safety, round(len(helpful) * config.safety_pairs_per_helpfulness_pair))
    else:
        share = config.helpfulness_share_in_safety
        mixed = safety + take(helpful, round(len(safety) * share / (1 - share)))
    rng.shuffle(mixed)
    return mixed


def pair_messages(rec: PreferenceRecord, response: str) -> list[dict]:
    return rec.context_messages() + [{"role": "assistant", "content": response}]


def tokenize_pairs(tokenizer, records: Sequence[PreferenceRecord], margin_table: str) -> list[dict]:
    rows = []
    for r in records:
        rows.append({
            "chosen_ids": encode_dialog(tokenizer, pair_messages(r, r.chosen)).input_ids,
            "rejected_ids": encode_dialog(tokenizer, pair_messages(r, r.rejected)).input_ids,
            "margin": margin_for(r.rating, margin_table),
        })
    return rows


class RewardScorer:
    """Batched scores for (prompt, response) pairs from a saved reward model (LoRA adapter or full weights).

    Sequences are sorted by length before batching, so padding is paid only within similar lengths.
    """

    def __init__(self, path: str | Path, device: str | torch.device = "auto", dtype: str | torch.dtype = "auto",
                 batch_size: int = 64, model=None, tokenizer=None):
        from ..model import build_model, freeze

        self.path = str(path)
        self.model = model if model is not None else freeze(build_model(path, "reward", device=device, dtype=dtype))
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(path)
        self.batch_size = batch_size
        self.device = next(self.model.parameters()).device

    @no_grad
    def score_ids(self, sequences: Sequence[Sequence[int]]) -> torch.Tensor:
        """Raw scalar scores (float32, on the CPU) for full token sequences, in the given order."""
        import torch

        pad = self.tokenizer.pad_token_id
        scores = torch.empty(len(sequences), dtype=torch.float32)
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            width = max(len(sequences[i]) for i in idx)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, i in enumerate(idx):
                seq = torch.as_tensor(sequences[i], dtype=torch.long)
                ids[row, : len(seq)] = seq
                mask[row, : len(seq)] = 1
            out = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device))
            scores[idx] = out.logits[:, 0].float().cpu()
        return scores

    def score(self, prompts: Sequence[str | Sequence[dict]], responses: Sequence[str]) -> torch.Tensor:
        if len(prompts) != len(responses):
            raise InputError(f"{len(prompts)} prompts but {len(responses)} responses")
        seqs = [encode_dialog(self.tokenizer, prompt_messages(p) + [{"role": "assistant", "content": r}]).input_ids
                for p, r in zip(prompts, responses)]
        return self.score_ids(seqs)


def evaluate_pairs(scorer: RewardScorer, records: Sequence[PreferenceRecord], unsafe_threshold: float = 0.5,
                   per_pair: bool = False) -> dict:
    """Accuracy overall, per rating, per category and per category x rating; safety recall of unsafe responses.
    ``per_pair``: also ``correct``, 1 or 0 per record in order (for a paired comparison of two models)."""
    if not records:
        return {}
    chosen = scorer.score([r.context_messages() for r in records], [r.chosen for r in records])
    rejected = scorer.score([r.context_messages() for r in records], [r.rejected for r in records])
    correct = (chosen > rejected).tolist()

    def acc(pred):
        sel = [c for c, r in zip(correct, records) if pred(r)]
        return round(sum(sel) / len(sel), 4) if sel else None

    table = {cat: {rt: acc(lambda r, c=cat, t=rt: r.category == c and r.rating == t) for rt in RATINGS}
             for cat in sorted({r.category for r in records})}
    counts = {cat: {rt: sum(1 for r in records if r.category == cat and r.rating == rt) for rt in RATINGS}
              for cat in table}
    metrics = {
        "accuracy": acc(lambda r: True),
        "accuracy_by_rating": {rt: acc(lambda r, t=rt: r.rating == t) for rt in RATINGS},
        "accuracy_by_category": {cat: acc(lambda r, c=cat: r.category == c) for cat in table},
        "accuracy_table": table,
        "heldout_counts": counts,
        "heldout_pairs": len(records),
        "mean_score_chosen": round(float(chosen.mean()), 4),
        "mean_score_rejected": round(float(rejected.mean()), 4),
    }
    if per_pair:
        metrics["correct"] = [int(c) for c in correct]
    # Safety: recall of the responses labelled unsafe, flagged when sigmoid(score) < threshold.
    unsafe_scores = [float(s) for r, s in zip(records, chosen) if r.chosen_safe is False]
    unsafe_scores += [float(s) for r, s in zip(records, rejected) if r.rejected_safe is False]
    if unsafe_scores:
        flagged = [1.0 / (1.0 + math.exp(-s)) < unsafe_threshold for s in unsafe_scores]
        metrics["unsafe_recall"] = round(sum(flagged) / len(flagged), 4)
        metrics["unsafe_responses"] = len(flagged)
    return metrics


@stage(lambda config: f"reward-{config.kind}")
def run_reward(config: RewardConfig, inputs: RewardInputs, run: StageRun) -> StageOutput:
    """Train one reward model (``config.kind``) on the mixed preference pairs; evaluate it on held-out pairs."""
    from datasets import Dataset
    from trl import RewardConfig as TRLRewardConfig
    from trl import RewardTrainer

    from .. import fsdp
    from ..model import build_model, freeze, is_peft, trainable_parameters

    records = read_preferences(inputs.data, inputs.data_format)
    if config.kind not in {r.category for r in records}:
        raise InputError(f"{inputs.data}: no {config.kind} pairs: the {config.kind} reward model has nothing to learn")
    tokenizer = load_tokenizer(inputs.sft_model)
    train_pool, heldout = split_heldout(records, config.heldout_fraction, config.max_heldout_per_category,
                                        config.seed)
    train_recs = mix_training_pairs(train_pool, config)

    run.out_dir.mkdir(parents=True, exist_ok=True)
    run.provenance["sharding"] = fsdp.describe(config)
    # From a LoRA SFT checkpoint the SFT adapter is merged first; a LoRA RM points at the checkpoint it starts from
    # (the SFT checkpoint, or the reward model it is warm-started from).
    start = inputs.init or inputs.sft_model
    model = build_model(start, "reward", lora=config.lora, dtype=resolve_dtype(config.dtype),
                        seed=config.seed, gradient_checkpointing=config.gradient_checkpointing,
                        continue_adapter=False, device=fsdp.build_device(config))
    train_ds = Dataset.from_list(tokenize_pairs(tokenizer, train_recs, config.margin))
    eval_recs = [r for r in heldout if r.category == config.kind][:256]
    eval_ds = Dataset.from_list(tokenize_pairs(tokenizer, eval_recs, config.margin)) if eval_recs else None
    args = TRLRewardConfig(**trainer_arguments(config, run.out_dir, len(train_ds), eval_ds is not None),
                           center_rewards_coefficient=None, disable_dropout=True)
    trainer = make_trainer(RewardTrainer, config, run, model=model, args=args, train_dataset=train_ds,
                           eval_dataset=eval_ds, processing_class=tokenizer)
    train(trainer, run)

    metrics: dict = {}
    artifacts: dict[str, str] = {}
    base = start if is_peft(trainer.model) else None
    final = fsdp.save_final(trainer.model, run.out_dir / FINAL_DIR, tokenizer, role="reward", base=base,
                            dtype=resolve_dtype(config.dtype))
    if dist.is_main() or fsdp.is_sharded(trainer.model):  # a sharded model scores on every rank (each forward gathers)
        scorer = RewardScorer(final, model=freeze(trainer.model), tokenizer=tokenizer,
                              batch_size=config.score_batch_size)
        metrics = evaluate_pairs(scorer, heldout, config.unsafe_threshold)
        trained, total = trainable_parameters(trainer.model)
        metrics.update(kind=config.kind, margin=config.margin, train_pairs=len(train_recs),
                       train_pairs_by_category={c: sum(1 for r in train_recs if r.category == c)
                                                for c in sorted({r.category for r in records})},
                       trainable_params=trained, total_params=total, **logged_losses(run.out_dir))
    if dist.is_main():
        artifacts = _write_artifacts(config, metrics, run.out_dir)
    return StageOutput(final=run.out_dir / FINAL_DIR, metrics=metrics, steps=trainer.state.global_step,
                       planned_steps=trainer.state.max_steps, artifacts=artifacts)


def _write_artifacts(config: RewardConfig, metrics: dict, out_dir: Path) -> dict[str, str]:
    """The held-out metrics as JSON and the training curves (rank 0)."""
    from ..plots import plot_curves

    atomic_write_json(out_dir / "heldout_metrics.json", metrics)
    artifacts = {"heldout_metrics": "heldout_metrics.json"}
    if plot_curves(read_jsonl(out_dir / METRICS_FILE), ["loss", "accuracy", "eval_accuracy"], out_dir / "curves.png",
                   title=f"{config.kind} reward model"):
        artifacts["curves"] = "curves.png"
    return artifacts
