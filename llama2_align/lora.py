"""LoRA (and QLoRA) settings for any role, configured once: the ``lora`` field of every training stage's config.

Light to import (pydantic only; peft loads when an adapter is made), like every module a config needs, so that a
config is checked without loading the ML stack (``tests/unit/test_light_imports.py``). The model factory
(``llama2_align.model.build_model``) applies them.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

DEFAULT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# QLoRA: the frozen base's linear layers of the decoder blocks in 4-bit NF4 (bitsandbytes), double-quantized
# constants, compute in the model's dtype; the LM head and the scalar head stay in full precision.
Quantize = Literal["none", "nf4"]


class LoraSettings(BaseModel):
    """LoRA for any role, configured once. Default targets: every linear projection of the Llama block.

    ``quantize="nf4"`` is QLoRA: the frozen base is loaded in 4-bit NF4 (bitsandbytes) under the adapters."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = False
    r: int = Field(8, ge=1)
    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))
    quantize: Quantize = Field("none", description="nf4: QLoRA, a 4-bit NF4 frozen base (needs enabled: true)")

    @model_validator(mode="after")
    def _quantize_needs_lora(self):
        if self.quantize != "none" and not self.enabled:
            raise ValueError(f"lora.quantize={self.quantize!r} quantizes the frozen base under LoRA adapters: it "
                             "needs lora.enabled=true (a fully trained model cannot be 4-bit)")
        return self

    def peft_config(self, role: str):
        from peft import LoraConfig, TaskType

        from .model import SCALAR_ROLES

        scalar = role in SCALAR_ROLES
        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=list(self.target_modules),
            task_type=TaskType.SEQ_CLS if scalar else TaskType.CAUSAL_LM,
            modules_to_save=["score"] if scalar else None,
        )
