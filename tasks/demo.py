"""The built-in demo world as a Prefect task: the datasets (JSONL) and a tokenizer trained on the world's text."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from prefect import get_run_logger, task

from llama2_align.demo_dialogues import corpus_texts, write_extended_sft, write_instruction_demonstrations
from llama2_align.demo_world import DemoSizes, generate_demo_world, write_demo_datasets
from llama2_align.io import atomic_write_json
from llama2_align.pipeline import DEMO_DATA_RECORD, demo_data_record
from llama2_align.tokenizer import ensure_tokenizer

from .common import RETRIES, retry_transient


def demo_sizes(sizes: str) -> DemoSizes:
    return DemoSizes.micro() if sizes == "micro" else DemoSizes()


@task(name="demo-data", task_run_name="demo-data", retries=RETRIES, retry_condition_fn=retry_transient)
def demo_data_task(out_dir: str, seed: int = 0, sizes: Literal["default", "micro"] = "default",
                   vocab_size: int = 2048, dialogues: bool = False, preprompts: bool = False,
                   evasive: bool = False) -> dict[str, str]:
    """Write the demo datasets and tokenizer under ``out_dir``; returns ``{"sft", "preference", "prompts", "eval",
    "tokenizer"}`` paths (and ``"instruction_demos"`` with ``dialogues``). Deterministic for a seed; the tokenizer is
    kept when it already exists with these settings (seed, sizes, vocabulary size), and trained again when they
    changed.

    ``dialogues`` / ``preprompts`` (GAtt / context distillation): the SFT set is ``sft_extended.jsonl``, the world's
    demonstrations followed by the extra ones (``llama2_align.demo_dialogues``), and the tokenizer, trained on their
    text too, lives in its own directory (``tokenizer+dialogues+preprompts``). ``evasive``: the preference pairs hold
    the evasive safety pairs (``preferences+evasive.jsonl``); the tokenizer is the world's without them, the same
    one either way."""
    logger = get_run_logger()
    written = write_demo_datasets(Path(out_dir) / "data", seed, demo_sizes(sizes), evasive)
    paths = {k: str(v) for k, v in written.items()}
    extras = [name for name, on in (("dialogues", dialogues), ("preprompts", preprompts)) if on]
    extra: list[dict] = []
    if extras:
        sft, extra = write_extended_sft(Path(out_dir) / "data", seed, demo_sizes(sizes), dialogues, preprompts)
        paths["sft"] = str(sft)
    if dialogues:  # GAtt's instruction demonstrations (not in the SFT set; the tokenizer does not need them)
        paths["instruction_demos"] = str(write_instruction_demonstrations(Path(out_dir) / "data", seed,
                                                                          demo_sizes(sizes)))
    tok_dir = Path(out_dir) / "+".join(["tokenizer"] + extras)

    def texts() -> list[str]:
        world = generate_demo_world(seed, demo_sizes(sizes)).corpus_texts()
        return list(dict.fromkeys(world + (corpus_texts(extra) if extra else [])))

    ensure_tokenizer(texts, tok_dir, vocab_size, seed, settings={"sizes": sizes})
    paths["tokenizer"] = str(tok_dir)
    atomic_write_json(Path(out_dir) / "data" / DEMO_DATA_RECORD,
                      demo_data_record(seed, sizes, vocab_size, dialogues, preprompts, evasive))
    logger.info(f"demo world (seed {seed}, {sizes} sizes): {paths}")
    return paths
