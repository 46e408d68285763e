"""The memory plan: per-GPU memory of every pipeline stage, and the sharding, micro-batch and QLoRA that make it fit.

Pure arithmetic on the model's shapes (parameter counts are exact: :func:`model.describe_preset` builds the preset on
the meta device) and the stages' configs; no GPU, no Prefect. ``llama2-align plan`` prints it; the pipeline calls
:func:`check_plan` before it launches a stage.

Per GPU, per stage (all sizes in bytes; ``p`` is the compute dtype's size, 2 for bf16, 4 for fp32):

- weights: every resident role. Full precision: ``params * p``. QLoRA base: the decoder's linear layers in NF4,
  0.5 byte/param plus double-quantized constants (an 8-bit absmax per 64-block and an fp32 one per 256 of those:
  1/64 + 4/16384 byte/param); everything else (embeddings, norms, LM/score head) float32, as peft's
  ``prepare_model_for_kbit_training`` leaves it. LoRA adapters are float32 (peft up-casts them). PPO holds the
  policy, the reference (the policy with adapters off under LoRA, else a frozen copy), the value model (its own
  base) and both reward models.
- gradients: trainable parameters only (the adapters and, for a reward/value model, the score head, under LoRA),
  in the parameter's dtype; DDP's bucket copy doubles them when several processes replicate the model.
- optimizer: AdamW's m and v in float32 (8 bytes per trainable parameter), plus a float32 master copy (4 bytes) when
  full-parameter training runs in bf16/fp16 (mixed precision, as FSDP's MixedPrecisionPolicy keeps it).
- activations, per micro-batch ``b`` x sequence ``s``, per decoder layer and token (Korthikanti et al. 2022,
  "Reducing Activation Recomputation in Large Transformer Models", section 4, adapted to what transformers' Llama
  saves for backward, checked tensor by tensor with ``torch.autograd.graph.saved_tensors_hooks``):
  SDPA keeps no ``s x s`` score matrix (the flash / memory-efficient kernels), so Korthikanti's ``5as/h`` term
  drops; dropout is off in Llama. What stays:

  * two RMSNorms: the float32 up-cast input (``4h`` each) and, when the norm weight trains, its bf16 input (``p h``);
  * attention: the q/k/v input, q after RoPE, k and v repeated to all heads (transformers' SDPA path with a padding
    mask), the SDPA output and the o_proj input (``6 p h``); the projection inputs only when their weights train
    (autograd saves a matmul's input only for its weight's gradient);
  * SwiGLU MLP: gate output (SiLU input), SiLU output, up output, down input (``4 p f``) plus the gate/up input
    (``p h``), again the projection inputs only when trained;
  * LoRA on a module of input width ``w``: the adapter keeps its input for its own gradient, which the frozen
    projection does not; peft casts it to the adapter's float32, one copy per adapter (``4w``), dropout adds its mask
    (``1w`` on CUDA); in float32 without dropout the adapters of q/k/v (and of gate/up) share the one input
    (``p w``); plus the rank-``r`` hidden (``4r``).

  Full fine-tuning in bf16 gives ``26h + 8f`` bytes per layer per token (Korthikanti's GPT block: ``34h``). With
  activation checkpointing (one checkpoint per decoder layer) each layer keeps only its input (``p h``), and the
  backward pass recomputes one layer at a time: ``L p h + one layer``. QLoRA's float32 embeddings make the residual
  stream float32 (``p = 4`` for its activations).
- logits: SFT's loss up-casts ``[b, s, V]`` to float32 and log-softmax keeps its output, with the gradient beside it
  at the start of backward: ``(p + 8) V`` per token. PPO keeps the response positions' logits (``[b, T, V]``,
  selected, up-cast and log-softmaxed: ``(p + 8) V`` per response token) after a full-width ``p V`` forward.
- rollout KV cache (PPO, rejection sampling, evaluation): the static cache
  ``batch x (prompt + new tokens) x layers x 2 x kv_heads x head_dim x p``, its additive prefill mask
  ``batch x prompt x (prompt + new) x p``, and the prefill's transient (one layer's q/k/v, attention output and
  MLP intermediates over the prompt).
- no-grad scoring (PPO's old/ref log-probs and values, the reward models): one layer's transient plus the logits.

A stage's total is its resident state (weights + gradients + optimizer) plus the largest of its phases (PPO: rollout,
scoring or the update; rejection sampling: sampling, scoring or its SFT), plus a reserve for the CUDA context,
NCCL buffers and fragmentation (``reserve``, 2 GiB by default).

Sharding: ``none`` (one process) or ``ddp`` (N processes, each holding the whole model) when a stage fits that way;
else FSDP full sharding over all ``gpus x nodes`` processes, which divides weights, gradients and optimizer state by
the world size and adds the gathered working set (two decoder layers in flight per sharded model, plus one layer's
gradients). Then activation checkpointing is switched on, then the micro-batch is halved down to 1 (the
generation and scoring batches with it), then, for a LoRA config, QLoRA is tried (from the configured micro-batch
again), else the stage is refused. Only SFT, the reward models, PPO and rejection sampling's SFT can be sharded
(rejection sampling's sampling and scoring and the evaluation hold whole models).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Iterable

from .errors import InputError
from .model import DEFAULT_LORA_TARGETS, PRESETS, LoraSettings, describe_preset

GiB = 2**30
DEFAULT_RESERVE = 2 * GiB
DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2}
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4-bit codes + double-quantized absmax constants
ADAPTER_BYTES = 4  # peft keeps LoRA weights in float32 (autocast_adapter_dtype)
STAGES = ("sft", "reward-helpfulness", "reward-safety", "rejection-sampling", "ppo", "eval")
LORA_INPUT_GROUPS = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))
SHARDABLE = {"sft", "reward-helpfulness", "reward-safety", "ppo"}  # + rejection sampling's SFT phase

_UNITS = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
          "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


class PlanRefused(InputError):
    """At least one stage cannot fit the GPUs; the message holds the plan table with the numbers."""

    def __init__(self, message: str, plan: "Plan"):
        super().__init__(message)
        self.plan = plan


def parse_memory(text: str | int | float) -> int:
    """``"80GiB"`` -> bytes. Binary units (KiB..TiB; a bare K/M/G/T is binary too), decimal KB..TB, plain bytes."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        if text <= 0:
            raise ValueError(f"memory size must be positive, got {text}")
        return int(text)
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS:
        raise ValueError(f"memory size {text!r}: expected a number with a unit such as 80GiB, 80GB, 81920MiB or "
                         "40G (binary)")
    value = int(float(m.group(1)) * _UNITS[unit])
    if value <= 0:
        raise ValueError(f"memory size {text!r} must be positive")
    return value


def fmt_bytes(n: float) -> str:
    if n >= GiB:
        return f"{n / GiB:,.1f} GiB"
    if n >= 2**20:
        return f"{n / 2**20:,.1f} MiB"
    return f"{n / 2**10:,.1f} KiB"


# ----------------------------------------------------------------------------------------------------------------
# Shapes
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    """A Llama 2 model's shapes and exact parameter count (causal LM)."""

    preset: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    context: int
    params: int

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def module_dims(self) -> dict[str, tuple[int, int]]:
        """(in, out) of every linear projection of a decoder layer."""
        h, kv, f = self.hidden, self.kv_dim, self.ffn
        return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
                "gate_proj": (h, f), "up_proj": (h, f), "down_proj": (f, h)}

    @property
    def linear_per_layer(self) -> int:
        return sum(i * o for i, o in self.module_dims().values())

    @property
    def layer_params(self) -> int:
        return self.linear_per_layer + 2 * self.hidden  # + two RMSNorm weights

    def total(self, scalar: bool = False) -> int:
        """Parameters of the causal LM, or of the scalar-head model (LM head -> a 1-output score head)."""
        return self.params - self.vocab * self.hidden + self.hidden if scalar else self.params

    def quantizable(self) -> int:
        """Parameters that QLoRA stores in 4 bits: the decoder layers' linear projections."""
        return self.layers * self.linear_per_layer

    def lora_params(self, lora: LoraSettings, scalar: bool = False) -> int:
        dims = self.module_dims()
        unknown = [t for t in lora.target_modules if t not in dims]
        if unknown:
            raise ValueError(f"lora.target_modules: unknown projection(s) {unknown}; expected some of "
                             f"{', '.join(DEFAULT_LORA_TARGETS)}")
        per_layer = sum(lora.r * (dims[t][0] + dims[t][1]) for t in lora.target_modules)
        return self.layers * per_layer + (self.hidden if scalar else 0)  # + the trained copy of the score head


def model_shape(preset: str, vocab_size: int | None = None) -> ModelShape:
    """The shapes of a model preset; ``vocab_size`` replaces the preset's (the demo models take the tokenizer's)."""
    info = describe_preset(preset)  # exact: built on the meta device
    shape = ModelShape(preset=preset, hidden=info["hidden_size"], layers=info["num_layers"],
                       heads=info["num_heads"], kv_heads=info["num_kv_heads"], head_dim=info["head_dim"],
                       ffn=info["ffn_size"], vocab=info["vocab_size"], context=info["context_length"],
                       params=info["parameters"])
    analytic = 2 * shape.vocab * shape.hidden + shape.layers * shape.layer_params + shape.hidden
    if analytic != shape.params:  # the per-module arithmetic below must describe the real model
        raise AssertionError(f"{preset}: {analytic} analytic parameters, {shape.params} on the meta device")
    if vocab_size is not None and vocab_size != shape.vocab:
        shape = replace(shape, vocab=vocab_size, params=shape.params + 2 * (vocab_size - shape.vocab) * shape.hidden)
    return shape


# ----------------------------------------------------------------------------------------------------------------
# Per-role resident memory
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class RoleMemory:
    name: str
    weights: float
    grads: float = 0.0
    optim: float = 0.0
    layer_bytes: float = 0.0  # one decoder layer's stored weights (the FSDP all-gather unit)
    layer_grad_bytes: float = 0.0


def role_memory(shape: ModelShape, name: str, *, scalar: bool, mode: str, p: int, lora: LoraSettings | None = None,
                qlora: bool = False) -> RoleMemory:
    """``mode``: ``full`` (every parameter trains), ``lora`` (adapters train over a frozen base) or ``frozen``."""
    total = shape.total(scalar)
    if qlora and mode == "lora":
        q = shape.quantizable()
        base = q * NF4_BYTES_PER_PARAM + (total - q) * 4
        layer = shape.linear_per_layer * NF4_BYTES_PER_PARAM + 2 * shape.hidden * 4
    else:
        base = total * p
        layer = shape.layer_params * p
    if mode == "frozen":
        return RoleMemory(name, base, layer_bytes=layer)
    if mode == "full":
        master = 4 * total if p < 4 else 0
        return RoleMemory(name, base, grads=total * p, optim=8 * total + master, layer_bytes=layer,
                          layer_grad_bytes=shape.layer_params * p)
    if mode != "lora" or lora is None:
        raise ValueError(f"role mode {mode!r}")
    a = shape.lora_params(lora, scalar)
    per_layer_a = (a - (shape.hidden if scalar else 0)) / shape.layers
    return RoleMemory(name, base + a * ADAPTER_BYTES, grads=a * ADAPTER_BYTES, optim=8 * a,
                      layer_bytes=layer + per_layer_a * ADAPTER_BYTES, layer_grad_bytes=per_layer_a * ADAPTER_BYTES)


# ----------------------------------------------------------------------------------------------------------------
# Activations, logits, KV cache
# ----------------------------------------------------------------------------------------------------------------


def layer_activation_bytes(shape: ModelShape, p: int, mode: str, lora: LoraSettings | None = None) -> float:
    """Bytes one decoder layer keeps for backward, per token (no checkpointing); see the module docstring."""
    h, f = shape.hidden, shape.ffn
    full = mode == "full"
    norms = 2 * (4 * h + (p * h if full else 0))
    attn = p * (4 * h)  # q after RoPE, k and v repeated to every head, the SDPA output
    mlp = p * (3 * f)  # SiLU input, SiLU output, up output
    if full:  # the projections' inputs, kept for their weights' gradients
        attn += p * (h + h)  # q/k/v input, o_proj input
        mlp += p * (h + f)  # gate/up input, down input
    elif mode == "lora" and lora is not None:
        dims = shape.module_dims()
        for group in LORA_INPUT_GROUPS:  # projections that read the same input tensor
            targeted = [t for t in group if t in lora.target_modules]
            if not targeted:
                continue
            w = dims[targeted[0]][0]
            if p < 4 or lora.dropout > 0:  # each adapter keeps its own float32 copy (cast / dropout output) + mask
                attn += len(targeted) * (4 * w + (1 * w if lora.dropout > 0 else 0))
            else:  # the adapters keep the shared input itself
                attn += p * w
            attn += len(targeted) * 4 * lora.r
    return norms + attn + mlp


def training_activation_bytes(shape: ModelShape, tokens: int, p: int, mode: str, lora: LoraSettings | None,
                              checkpointing: bool) -> float:
    """Activations of one micro-batch of ``tokens`` tokens (no logits)."""
    per_layer = layer_activation_bytes(shape, p, mode, lora)
    final = 4 * shape.hidden + (2 * p * shape.hidden if mode == "full" else 0)  # final norm (+ LM-head input)
    if checkpointing:
        return tokens * (shape.layers * p * shape.hidden + per_layer + final)
    return tokens * (shape.layers * per_layer + final)


def prefill_transient_bytes(shape: ModelShape, tokens: int, p: int) -> float:
    """One layer's no-grad transient over ``tokens`` tokens: normed input, q/k/v, attention output, MLP."""
    return tokens * p * (4 * shape.hidden + 2 * shape.kv_dim + 3 * shape.ffn)


def kv_cache_bytes(shape: ModelShape, batch: int, prompt: int, new: int, p: int) -> float:
    total = prompt + new
    cache = batch * total * shape.layers * 2 * shape.kv_dim * p
    mask = batch * prompt * total * p  # the prefill's additive mask
    return cache + mask


# ----------------------------------------------------------------------------------------------------------------
# Estimates
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class StageEstimate:
    stage: str
    sharding: str = "none"  # none | ddp | fsdp | single
    world: int = 1
    micro_batch: int = 1
    generation_batch: int | None = None
    qlora: bool = False
    checkpointing: bool = False
    weights: float = 0.0
    grads: float = 0.0
    optim: float = 0.0
    activations: float = 0.0  # training phase, as configured (checkpointing on or off), logits included
    activations_no_ckpt: float = 0.0
    activations_ckpt: float = 0.0
    kv_cache: float = 0.0  # rollout phase
    peak_phase: str = "train"
    total: float = 0.0
    budget: float = 0.0
    fits: bool = False
    enabled: bool = True
    choices: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("weights", "grads", "optim", "activations", "activations_no_ckpt", "activations_ckpt", "kv_cache",
                  "total", "budget"):
            d[k] = int(round(d[k]))
        return d


@dataclass
class Plan:
    preset: str
    model: str
    gpus: int
    nodes: int
    gpu_memory: int
    reserve: int
    prompt_tokens: int
    stages: list[StageEstimate]

    @property
    def world(self) -> int:
        return self.gpus * self.nodes

    @property
    def fits(self) -> bool:
        return all(s.fits for s in self.stages if s.enabled)

    def refused(self) -> list[StageEstimate]:
        return [s for s in self.stages if s.enabled and not s.fits]

    def as_dict(self) -> dict[str, Any]:
        return {"preset": self.preset, "model": self.model, "gpus": self.gpus, "nodes": self.nodes,
                "world_size": self.world, "gpu_memory": self.gpu_memory, "reserve": self.reserve,
                "prompt_tokens": self.prompt_tokens, "fits": self.fits,
                "stages": [s.as_dict() for s in self.stages]}

    def table(self) -> str:
        head = ["stage", "sharding", "micro-batch", "qlora", "ckpt", "weights", "grads", "optim", "activations",
                "kv cache", "total", "fits?"]
        rows = []
        for s in self.stages:
            mb = str(s.micro_batch) + (f" (gen {s.generation_batch})" if s.generation_batch else "")
            shard = s.sharding + (f" x{s.world}" if s.sharding in ("ddp", "fsdp") else "")
            fits = "yes" if s.fits else "NO"
            if not s.enabled:
                fits += " (off)"
            ckpt = "-" if s.sharding == "single" else "on" if s.checkpointing else "off"
            rows.append([s.stage, shard, mb, "nf4" if s.qlora else "-", ckpt,
                         *(fmt_bytes(n) if n > 0 else "-" for n in (s.weights, s.grads, s.optim, s.activations,
                                                                    s.kv_cache, s.total)), fits])
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        right = {5, 6, 7, 8, 9, 10}

        def line(cells):
            return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
        out = [f"memory plan: {self.preset} (model {self.model}) on {self.nodes} node(s) x {self.gpus} GPU(s) of "
               f"{fmt_bytes(self.gpu_memory)} (world size {self.world}; {fmt_bytes(self.reserve)} reserved per GPU; "
               f"prompts <= {self.prompt_tokens} tokens)", line(head), line(["-" * w for w in widths])]
        out += [line(r) for r in rows]
        notes = [f"  {s.stage}: {n}" for s in self.stages for n in [*s.choices, *s.notes]]
        if notes:
            out += ["", "notes:", *notes]
        return "\n".join(out)


def _dtype_bytes(dtype: str, device: str) -> int:
    if dtype == "auto":
        return 2 if device == "cuda" else 4
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype {dtype!r}: expected auto, fp32, bf16 or fp16")
    return DTYPE_BYTES[dtype]


@dataclass
class _Phase:
    name: str
    extra_weights: float = 0.0  # weights resident only in this phase (rejection sampling's phases)
    activations: float = 0.0
    kv: float = 0.0
    transient: float = 0.0

    @property
    def dynamic(self) -> float:
        return self.activations + self.kv + self.transient


def _assemble(stage: str, roles: list[RoleMemory], phases: list[_Phase], sharding: str, world: int,
              budget: float, reserve: float, trainable_ddp: bool) -> StageEstimate:
    weights = sum(r.weights for r in roles)
    grads = sum(r.grads for r in roles)
    optim = sum(r.optim for r in roles)
    if sharding == "fsdp":
        weights, grads, optim = weights / world, grads / world, optim / world
        weights += sum(2 * r.layer_bytes for r in roles)  # two gathered layers in flight per sharded model
        grads += sum(r.layer_grad_bytes for r in roles)  # one layer's unsharded gradients before reduce-scatter
    elif sharding == "ddp" and trainable_ddp:
        grads *= 2  # DDP's gradient buckets
    peak = max(phases, key=lambda ph: ph.extra_weights / (world if sharding == "fsdp" else 1) + ph.dynamic)
    extra = peak.extra_weights / (world if sharding == "fsdp" else 1)
    est = StageEstimate(stage=stage, sharding=sharding, world=world, weights=weights + extra, grads=grads,
                        optim=optim, peak_phase=peak.name)
    train = next((ph for ph in phases if ph.name == "train"), None)
    est.activations = train.activations if train else 0.0
    roll = next((ph for ph in phases if ph.name == "rollout"), None)
    est.kv_cache = roll.kv if roll else 0.0
    est.total = weights + extra + grads + optim + peak.dynamic + reserve
    est.budget = budget
    est.fits = est.total <= budget
    return est


@dataclass
class _Knobs:
    micro: int
    gen: int | None
    score: int | None
    checkpointing: bool
    qlora: bool


def _train_stage(stage: str, shape: ModelShape, cfg, p: int, knobs: _Knobs, scalar: bool, pairs: bool,
                 sharding: str, world: int, budget: float, reserve: float) -> StageEstimate:
    lora = cfg.lora if cfg.lora.enabled else None
    mode = "lora" if lora else "full"
    ap = 4 if knobs.qlora else p  # QLoRA's float32 embeddings keep the residual stream in float32
    role = role_memory(shape, "policy" if not scalar else "reward", scalar=scalar, mode=mode, p=p, lora=lora,
                       qlora=knobs.qlora)
    seqs = knobs.micro * (2 if pairs else 1)  # the reward trainer runs chosen and rejected in one batch
    tokens = seqs * cfg.max_length
    act = {ck: training_activation_bytes(shape, tokens, ap, mode, lora, ck) for ck in (False, True)}
    logits = 0.0 if scalar else tokens * shape.vocab * (ap + 8)
    phase = _Phase("train", activations=act[knobs.checkpointing] + logits)
    est = _assemble(stage, [role], [phase], sharding, world, budget, reserve, trainable_ddp=True)
    est.activations_no_ckpt, est.activations_ckpt = act[False] + logits, act[True] + logits
    return est


def _ppo_stage(shape: ModelShape, rm_shape: ModelShape, cfg, p: int, knobs: _Knobs, prompt: int, sharding: str,
               world: int, budget: float, reserve: float) -> StageEstimate:
    lora = cfg.lora if cfg.lora.enabled else None
    vlora = cfg.value_lora if cfg.value_lora is not None else cfg.lora
    vlora = vlora if vlora.enabled else None
    ap = 4 if knobs.qlora else p
    roles = [role_memory(shape, "policy", scalar=False, mode="lora" if lora else "full", p=p, lora=lora,
                         qlora=knobs.qlora and lora is not None)]
    if lora is None:
        roles.append(role_memory(shape, "reference", scalar=False, mode="frozen", p=p))
    roles.append(role_memory(rm_shape, "value", scalar=True, mode="lora" if vlora else "full", p=p, lora=vlora,
                             qlora=knobs.qlora and vlora is not None))
    roles += [role_memory(rm_shape, f"reward-{k}", scalar=True, mode="frozen", p=p) for k in ("helpfulness",
                                                                                              "safety")]
    new = cfg.max_new_tokens
    width = prompt + new
    per_rank = max(1, cfg.prompts_per_iteration // world)
    gen = min(knobs.gen, per_rank)
    rollout = _Phase("rollout", kv=kv_cache_bytes(shape, gen, prompt, new, p),
                     transient=prefill_transient_bytes(shape, gen * prompt, p) + gen * shape.vocab * 8)
    sb = min(knobs.score, per_rank)
    scoring = _Phase("scoring", transient=prefill_transient_bytes(shape, sb * width, p)
                     + sb * shape.vocab * (width * p + new * (p + 8)))
    mb = min(knobs.micro, per_rank)
    tokens = mb * width
    acts = {}
    for ck in (False, True):
        acts[ck] = (training_activation_bytes(shape, tokens, ap, "lora" if lora else "full", lora, ck)
                    + training_activation_bytes(rm_shape, tokens, ap, "lora" if vlora else "full", vlora, ck))
    logits = mb * shape.vocab * (width * ap + new * (ap + 8))
    train = _Phase("train", activations=acts[knobs.checkpointing] + logits)
    est = _assemble("ppo", roles, [rollout, scoring, train], sharding, world, budget, reserve, trainable_ddp=False)
    est.activations_no_ckpt, est.activations_ckpt = acts[False] + logits, acts[True] + logits
    est.generation_batch = gen
    if not lora:
        est.notes.append("full-parameter PPO holds a separate frozen reference")
    return est


def _generation_stage(stage: str, shape: ModelShape, rm_shape: ModelShape, p: int, gen: int, score: int,
                      prompt: int, new: int, rms_resident: int, budget: float, reserve: float) -> StageEstimate:
    """Sampling from a frozen policy, scoring with the reward models (evaluation holds both RMs throughout;
    rejection sampling loads them one at a time after the policy is gone)."""
    policy = role_memory(shape, "policy", scalar=False, mode="frozen", p=p)
    rm = role_memory(rm_shape, "reward", scalar=True, mode="frozen", p=p)
    width = prompt + new
    resident = [RoleMemory("rms", rms_resident * rm.weights)] if rms_resident else []
    sampling = _Phase("rollout", extra_weights=policy.weights, kv=kv_cache_bytes(shape, gen, prompt, new, p),
                      transient=prefill_transient_bytes(shape, gen * prompt, p) + gen * shape.vocab * 8)
    scoring = _Phase("scoring", extra_weights=0 if rms_resident else rm.weights,
                     transient=prefill_transient_bytes(rm_shape, score * width, p))
    est = _assemble(stage, resident, [sampling, scoring], "single", 1, budget, reserve, trainable_ddp=False)
    est.generation_batch = gen
    return est


def _halvings(start: int) -> Iterable[int]:
    b = start
    while True:
        yield b
        if b <= 1:
            return
        b = max(1, b // 2)


def _choose(stage: str, build, knobs: _Knobs, world: int, shardable: bool, can_qlora: bool,
            trains: bool = True) -> StageEstimate:
    """The first configuration that fits, trying in order: replicated, FSDP, activation checkpointing, halved
    micro-batches, then all of it again with QLoRA. When nothing fits, the last (most frugal) try is returned."""
    if not shardable:
        shardings = ["single"]
    else:
        shardings = ["ddp" if world > 1 else "none"] + (["fsdp"] if world > 1 else [])
    largest = max(knobs.micro, knobs.gen or 1, knobs.score or 1)
    est = None
    for qlora in [knobs.qlora] + ([True] if can_qlora and not knobs.qlora else []):
        for sharding in shardings:
            for ck in [knobs.checkpointing] + ([True] if trains and not knobs.checkpointing else []):
                for factor in _halvings(largest):
                    def scaled(n, factor=factor):
                        return None if n is None else max(1, math.ceil(n * factor / largest))
                    k = _Knobs(micro=scaled(knobs.micro), gen=scaled(knobs.gen), score=scaled(knobs.score),
                               checkpointing=ck, qlora=qlora)
                    est = build(k, sharding)
                    est.micro_batch, est.checkpointing, est.qlora = k.micro, ck, qlora
                    if est.fits:
                        _explain(est, knobs, k)
                        return est
    assert est is not None
    est.notes.append(f"does not fit even at micro-batch 1{' with QLoRA' if est.qlora else ''}"
                     f"{', sharded over ' + str(world) + ' GPUs' if est.sharding == 'fsdp' else ''}: needs "
                     f"{fmt_bytes(est.total)} per GPU of {fmt_bytes(est.budget)}")
    return est


def _explain(est: StageEstimate, asked: _Knobs, used: _Knobs) -> None:
    if est.sharding == "fsdp":
        est.choices.append(f"FSDP full sharding over {est.world} GPUs (does not fit replicated)")
    if used.checkpointing and not asked.checkpointing:
        est.choices.append("activation checkpointing switched on")
    if used.micro != asked.micro:
        est.choices.append(f"micro-batch halved {asked.micro} -> {used.micro}")
    if used.gen is not None and used.gen != asked.gen:
        est.choices.append(f"generation batch {asked.gen} -> {used.gen}")
    if used.qlora and not asked.qlora:
        est.choices.append("QLoRA (4-bit NF4 base) needed")


def model_preset(resolved) -> str:
    """The model preset whose shapes a resolved pipeline trains: its base model when that is a preset (the demo),
    else the one the pipeline preset names (``llama2-7b-lora`` -> ``llama2-7b``; the checkpoint may not be on this
    machine when planning)."""
    if resolved.base_model in PRESETS:
        return resolved.base_model
    return {"demo-tiny": "tiny", "demo-micro": "micro"}.get(resolved.preset, resolved.preset.removesuffix("-lora"))


def plan_pipeline(resolved, gpus: int = 1, gpu_memory: int | str = "80GiB", nodes: int = 1,
                  reserve: int | str = DEFAULT_RESERVE, prompt_tokens: int | None = None,
                  device: str = "cuda") -> Plan:
    """The memory plan of a resolved pipeline (:class:`pipeline.ResolvedPipeline`) on ``nodes x gpus`` GPUs."""
    if gpus < 1 or nodes < 1:
        raise ValueError(f"gpus ({gpus}) and nodes ({nodes}) must be at least 1")
    memory = parse_memory(gpu_memory)
    reserve_b = parse_memory(reserve) if reserve not in (0, "0") else 0
    world = gpus * nodes
    size = model_preset(resolved)
    if size not in PRESETS:
        raise ValueError(f"no model shapes for {resolved.preset!r}")
    vocab = resolved.data.vocab_size if (size in ("micro", "tiny", "small") and resolved.data.source == "demo") \
        else None
    shape = model_shape(size, vocab)
    prompt = prompt_tokens or min(512, resolved.sft.max_length)
    budget = memory

    def knobs(cfg, gen=None, score=None, qlora=None) -> _Knobs:
        q = bool(qlora) if qlora is not None else getattr(getattr(cfg, "lora", None), "quantize", "none") == "nf4"
        return _Knobs(micro=cfg.micro_batch_size, gen=gen, score=score,
                      checkpointing=cfg.gradient_checkpointing, qlora=q)

    stages: list[StageEstimate] = []
    p_sft = _dtype_bytes(resolved.sft.dtype, device)
    stages.append(_choose("sft", lambda k, sh: _train_stage("sft", shape, resolved.sft, p_sft, k, False, False, sh,
                                                             world, budget, reserve_b),
                          knobs(resolved.sft), world, True, resolved.sft.lora.enabled))
    for kind in ("helpfulness", "safety"):
        cfg = getattr(resolved, f"reward_{kind}")
        pk = _dtype_bytes(cfg.dtype, device)
        stages.append(_choose(f"reward-{kind}", lambda k, sh, cfg=cfg, pk=pk, kind=kind: _train_stage(
            f"reward-{kind}", shape, cfg, pk, k, True, True, sh, world, budget, reserve_b), knobs(cfg), world, True,
            cfg.lora.enabled))

    rs = resolved.rejection_sampling
    p_rs = _dtype_bytes(rs.dtype, device)
    gen_est = _choose("rejection-sampling", lambda k, sh: _generation_stage(
        "rejection-sampling", shape, shape, p_rs, k.gen, k.score, prompt, rs.max_new_tokens, 0, budget, reserve_b),
        _Knobs(micro=1, gen=rs.generation_batch_size, score=rs.score_batch_size, checkpointing=False, qlora=False),
        world, False, False, trains=False)
    rs_sft = rs.sft
    sft_est = _choose("rejection-sampling", lambda k, sh: _train_stage(
        "rejection-sampling", shape, rs_sft, p_rs, k, False, False, sh, world, budget, reserve_b),
        knobs(rs_sft), world, True, rs_sft.lora.enabled)
    # Its peak is the larger of its sampling/scoring (whole models, one per process) and its SFT; both must fit.
    rs_est = gen_est if gen_est.total >= sft_est.total else sft_est
    rs_est.fits = gen_est.fits and sft_est.fits
    if rs_est is sft_est:
        rs_est.kv_cache = gen_est.kv_cache
        rs_est.notes.append(f"peak in its SFT; sampling (K={rs.k}, batch {gen_est.generation_batch}, whole policy "
                            f"per process) needs {fmt_bytes(gen_est.total)}")
    else:
        rs_est.notes.append(f"peak in sampling/scoring (whole models per process); its SFT needs "
                            f"{fmt_bytes(sft_est.total)} ({sft_est.sharding}, micro-batch {sft_est.micro_batch})")
    rs_est.enabled = resolved.rejection_sampling.enabled
    if not rs_est.enabled:
        rs_est.notes.append("off in this config (not counted)")
    stages.append(rs_est)

    ppo = resolved.ppo
    p_ppo = _dtype_bytes(ppo.dtype, device)
    stages.append(_choose("ppo", lambda k, sh: _ppo_stage(shape, shape, ppo, p_ppo, k, prompt, sh, world, budget,
                                                           reserve_b),
                          _Knobs(micro=ppo.micro_batch_size, gen=ppo.generation_batch_size, score=ppo.score_batch_size,
                                 checkpointing=ppo.gradient_checkpointing, qlora=ppo.lora.quantize == "nf4"),
                          world, True, ppo.lora.enabled))
    ev = resolved.eval
    p_ev = _dtype_bytes(ev.dtype, device)
    ev_est = _choose("eval", lambda k, sh: _generation_stage("eval", shape, shape, p_ev, k.gen, k.score, prompt,
                                                              ev.max_new_tokens, 2, budget, reserve_b),
                     _Knobs(micro=1, gen=ev.batch_size, score=ev.batch_size, checkpointing=False, qlora=False),
                     world, False, False, trains=False)
    ev_est.notes.append("runs in one process: the policy being evaluated and both reward models on one GPU")
    stages.append(ev_est)
    for s in stages:
        if s.sharding == "single":  # no training: its batch is the generation batch
            s.micro_batch, s.generation_batch = s.generation_batch or 1, None
    return Plan(preset=resolved.preset, model=size, gpus=gpus, nodes=nodes, gpu_memory=memory, reserve=reserve_b,
                prompt_tokens=prompt, stages=stages)


def check_plan(resolved, gpus: int, gpu_memory: int | str, nodes: int = 1, **kwargs) -> Plan:
    """The plan of ``resolved``; raises :class:`PlanRefused` (an ``InputError``: a validation error, never retried)
    with the table when an enabled stage cannot fit. The pipeline calls it before launching any stage."""
    plan = plan_pipeline(resolved, gpus=gpus, gpu_memory=gpu_memory, nodes=nodes, **kwargs)
    bad = plan.refused()
    if bad:
        lines = [f"{s.stage} needs {fmt_bytes(s.total)} per GPU, {fmt_bytes(s.budget)} available "
                 f"({s.sharding}, micro-batch {s.micro_batch}{', QLoRA' if s.qlora else ''})" for s in bad]
        raise PlanRefused("memory plan: the run cannot fit: " + "; ".join(lines) + "\n\n" + plan.table(), plan)
    return plan


def estimate(stage: str, shape: ModelShape, config, *, prompt_tokens: int = 512, device: str = "cuda",
             world: int = 1, sharding: str = "none", reserve: int = 0, gpu_memory: int = 2**50) -> StageEstimate:
    """One stage's estimate as configured (no choices made): ``stage`` is ``sft``, ``reward`` or ``ppo``."""
    if stage == "ppo":
        k = _Knobs(micro=config.micro_batch_size, gen=config.generation_batch_size, score=config.score_batch_size,
                   checkpointing=config.gradient_checkpointing, qlora=config.lora.quantize == "nf4")
        return _ppo_stage(shape, shape, config, _dtype_bytes(config.dtype, device), k, prompt_tokens, sharding, world,
                          gpu_memory, reserve)
    if stage not in ("sft", "reward"):
        raise ValueError(f"estimate: stage {stage!r}: expected sft, reward or ppo")
    k = _Knobs(micro=config.micro_batch_size, gen=None, score=None, checkpointing=config.gradient_checkpointing,
               qlora=config.lora.quantize == "nf4")
    return _train_stage(stage, shape, config, _dtype_bytes(config.dtype, device), k, stage == "reward",
                        stage == "reward", sharding, world, gpu_memory, reserve)
