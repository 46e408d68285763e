"""Run the SFT stage alone, from paths: ``python -m flows.sft --help`` or deploy ``flows/sft.py:sft``."""

from __future__ import annotations

from prefect import flow

from llama2_align.pipeline import preset_config
from llama2_align.stages.sft import SFTConfig, SFTInputs
from tasks.sft import sft_task


@flow(name="sft", log_prints=True)
def sft(data: str, out_dir: str = "runs/demo/sft", base: str = "tiny", tokenizer: str | None = None,
        config: SFTConfig = preset_config("demo-tiny").sft) -> dict:
    """Fine-tune ``base`` (a preset or a checkpoint directory) on the SFT dialogues in ``data`` into ``out_dir``.

    ``tokenizer`` defaults to the base checkpoint's own (a preset needs one). ``config`` holds every training
    setting (defaults: the demo-tiny preset's); a stage already finished for the same inputs is served from cache.
    """
    return sft_task(config, SFTInputs(base=base, data=data, tokenizer=tokenizer), out_dir)

