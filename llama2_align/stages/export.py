"""The export step at the end of the pipeline: the aligned policy as one plain HF directory and/or one GGUF file
for llama.cpp (``llama2_align.export``: LoRA merged, the tokenizer and the Llama 2 chat template carried along).

Stage directory: ``hf/`` (the HF export), ``model-<type>.gguf`` (the GGUF export), ``result.json`` (what was
written: sizes, tensor types, the merged adapters, seconds per format).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from .. import dist
from ..export import export_checkpoint
from .common import StageOutput, StageRun, stage


class ExportConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(False, description="export the final policy at the end of the pipeline")
    formats: list[Literal["hf", "gguf"]] = Field(default_factory=lambda: ["hf", "gguf"], min_length=1)
    gguf_type: Literal["f16", "q8_0"] = Field("f16", description="GGUF weights: f16, or q8_0 (8-bit blocks)")
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = Field("auto", description="HF weights; auto keeps the saved "
                                                                                 "dtype")


class ExportInputs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    checkpoint: str  # the policy to ship (the pipeline's final one)


@stage("export")
def run_export(config: ExportConfig, inputs: ExportInputs, run: StageRun) -> StageOutput:
    """Write every asked format of ``inputs.checkpoint`` into the stage directory (rank 0)."""
    outputs = {"hf": run.out_dir / "hf", "gguf": run.out_dir / f"model-{config.gguf_type}.gguf"}
    metrics: dict = {}
    if dist.is_main():
        run.out_dir.mkdir(parents=True, exist_ok=True)
        for k, fmt in enumerate(config.formats):
            _, meta = export_checkpoint(inputs.checkpoint, outputs[fmt], format=fmt, gguf_type=config.gguf_type,
                                        dtype=config.dtype, overwrite=True)
            metrics[fmt] = meta
            run.report(k + 1, len(config.formats), {"format": fmt, "seconds": meta["seconds"]})
    final = outputs["hf"] if "hf" in config.formats else outputs["gguf"]
    return StageOutput(final=final, metrics=metrics, steps=len(config.formats), planned_steps=len(config.formats))
