"""The one Llama 2 model module every stage uses.

It owns the named presets, the one factory that builds every role (policy, reference, reward, value), optional
LoRA for any role, and loading from HF-format directories, Meta's original format and our own stage outputs. The
transformer maths is transformers' Llama implementation (SDPA attention, KV cache, gradient checkpointing).

Roles:
- ``policy``: a causal LM (``LlamaForCausalLM``).
- ``reference``: the frozen policy. For a LoRA policy the reference is the *same* weights with the adapters disabled
  (see :class:`Reference`), so only one copy of the base sits in memory.
- ``reward`` / ``value``: the same backbone with a scalar head (``LlamaForSequenceClassification``, one label),
  initialised from a causal-LM checkpoint (the LM head is dropped, the score head is new) or from a reward model.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Literal

from .device import resolve_device, resolve_dtype
from .errors import ConfigError, InputError, InputNotFoundError
from .lora import DEFAULT_LORA_TARGETS, LoraSettings, Quantize  # noqa: F401 - re-exported (lora.py: no torch)

if TYPE_CHECKING:
    import torch
    from torch import nn
    from transformers import LlamaConfig, PreTrainedModel


def quiet_transformers() -> None:
    """Per-shard bars from every load/save drown the stage's own progress: transformers' bars off (called where
    models are loaded and saved, so that importing this module does not load transformers)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


Role = Literal["policy", "reference", "reward", "value"]
ROLES: tuple[str, ...] = ("policy", "reference", "reward", "value")
SCALAR_ROLES = ("reward", "value")

# File written beside every model we save; it says what the directory holds.
MODEL_META_FILE = "llama2_align_model.json"

# Llama 2 architecture constants shared by every preset.
LLAMA2_COMMON = dict(
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    hidden_act="silu",
    tie_word_embeddings=False,
    attention_bias=False,
    mlp_bias=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    initializer_range=0.02,
)

# name -> shape. vocab 32000 / context 4096 for the real family; the CPU presets keep the architecture (RMSNorm,
# SwiGLU, RoPE, GQA) at a size two CPU cores can train. Their vocab is the tokenizer's (set at build time).
PRESETS: dict[str, dict] = {
    "llama2-7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                      intermediate_size=11008, vocab_size=32000, max_position_embeddings=4096),
    "llama2-13b": dict(hidden_size=5120, num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40,
                       intermediate_size=13824, vocab_size=32000, max_position_embeddings=4096),
    "llama2-70b": dict(hidden_size=8192, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                       intermediate_size=28672, vocab_size=32000, max_position_embeddings=4096),
    "small": dict(hidden_size=256, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                  intermediate_size=704, vocab_size=8192, max_position_embeddings=512),
    # tiny/micro: 512 positions hold the demo's 8-turn dialogues (GAtt); RoPE has no position weights, so the
    # parameters and their initialisation are those of the 256-position presets they were.
    "tiny": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=344, vocab_size=2048, max_position_embeddings=512),
    "micro": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=172, vocab_size=1024, max_position_embeddings=512),
}

# QLoRA: the frozen base's linear layers of the decoder blocks in 4-bit NF4 (bitsandbytes), double-quantized
# constants, compute in the model's dtype; the LM head and the scalar head stay in full precision.
QUANT_SKIP_MODULES = ["lm_head", "score"]


def is_preset(name: str | Path) -> bool:
    return isinstance(name, str) and name in PRESETS


def llama_config(preset: str, vocab_size: int | None = None, **overrides) -> LlamaConfig:
    """The transformers config of a preset (vocab overridable: the demo presets take the tokenizer's)."""
    from transformers import LlamaConfig

    if preset not in PRESETS:
        raise ConfigError(f"unknown model preset {preset!r}: expected one of {', '.join(PRESETS)}")
    shape = dict(PRESETS[preset])
    if vocab_size is not None:
        shape["vocab_size"] = vocab_size
    return LlamaConfig(**{**LLAMA2_COMMON, **shape, **overrides})


def describe_preset(preset: str) -> dict:
    """Shapes, parameter count, attention kind and bf16 weight memory; built on the meta device (instant for 70B)."""
    import torch
    from transformers import LlamaForCausalLM

    config = llama_config(preset)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    return {
        "preset": preset,
        "hidden_size": config.hidden_size,
        "num_layers": config.num_hidden_layers,
        "num_heads": heads,
        "num_kv_heads": kv,
        "head_dim": config.hidden_size // heads,
        "ffn_size": config.intermediate_size,
        "vocab_size": config.vocab_size,
        "context_length": config.max_position_embeddings,
        "attention": "MHA" if kv == heads else f"GQA ({kv} KV heads)",
        "parameters": n_params,
        "weights_bf16_bytes": n_params * 2,
        "weights_bf16_gib": round(n_params * 2 / 2**30, 2),
    }


def human_count(n: float, units: tuple[str, ...] = ("", "K", "M", "B", "T")) -> str:
    """A count in K/M/B/T with two decimals (``6.74 B``); plain below 1000."""
    for unit in units:
        if abs(n) < 1000 or unit == units[-1]:
            return f"{n:.2f} {unit}".rstrip() if unit else f"{n:g}"
        n /= 1000
    raise AssertionError  # pragma: no cover


def format_preset_table(info: dict) -> str:
    """A :func:`describe_preset` result as aligned text (the body of the CLI's preset description)."""
    rows = [
        ("preset", info["preset"]),
        ("hidden size", f"{info['hidden_size']:,}"),
        ("layers", f"{info['num_layers']:,}"),
        ("heads", f"{info['num_heads']:,} (head dim {info['head_dim']})"),
        ("kv heads", f"{info['num_kv_heads']:,}"),
        ("attention", info["attention"]),
        ("ffn size", f"{info['ffn_size']:,}"),
        ("vocab", f"{info['vocab_size']:,}"),
        ("context", f"{info['context_length']:,}"),
        ("parameters", f"{info['parameters']:,} ({human_count(info['parameters'])})"),
        ("weights bf16", f"{info['weights_bf16_gib']:,} GiB"),
    ]
    width = max(len(k) for k, _ in rows) + 2
    return "\n".join(f"{k:<{width}}{v}" for k, v in rows)


# --------------------------------------------------------------------------------------------------------------
# Loading sources
# --------------------------------------------------------------------------------------------------------------


def source_kind(source: str | Path) -> str:
    """What a model source is: ``preset``, ``hf`` (config.json), ``meta`` (params.json) or ``adapter``."""
    if is_preset(str(source)) and not Path(source).exists():
        return "preset"
    path = Path(source)
    if not path.is_dir():
        raise InputNotFoundError(
            f"model source {str(source)!r} is neither a preset ({', '.join(PRESETS)}) nor a directory"
        )
    if (path / "adapter_config.json").exists():
        return "adapter"
    if (path / "config.json").exists():
        return "hf"
    if (path / "params.json").exists():
        return "meta"
    raise InputNotFoundError(
        f"{path}: not a model directory: expected config.json (HF format), params.json (Meta format) "
        "or adapter_config.json (LoRA adapter)"
    )


def read_model_meta(path: str | Path) -> dict:
    meta_file = Path(path) / MODEL_META_FILE
    return json.loads(meta_file.read_text()) if meta_file.exists() else {}


def adapter_base(path: str | Path) -> str:
    """The base model a saved adapter applies to (our pointer first, then PEFT's own field)."""
    meta = read_model_meta(path)
    if meta.get("base"):
        return meta["base"]
    cfg = json.loads((Path(path) / "adapter_config.json").read_text())
    base = cfg.get("base_model_name_or_path")
    if not base:
        raise InputError(f"{path}: adapter does not say which base model it applies to")
    return base


def _model_class(role: str):
    from transformers import LlamaForCausalLM, LlamaForSequenceClassification

    if role not in ROLES:
        raise ConfigError(f"unknown role {role!r}: expected one of {', '.join(ROLES)}")
    return LlamaForSequenceClassification if role in SCALAR_ROLES else LlamaForCausalLM


def _prepare_config(config: LlamaConfig, role: str) -> LlamaConfig:
    if role in SCALAR_ROLES:
        config.num_labels = 1
        if config.pad_token_id is None:
            config.pad_token_id = 0  # the scalar head reads the last non-pad token
    return config


def _load_base(source: str | Path, role: str, dtype: torch.dtype, vocab_size: int | None, seed: int,
               attn_implementation: str) -> PreTrainedModel:
    import torch
    from torch import nn
    from transformers.utils import logging as hf_logging

    cls = _model_class(role)
    kind = source_kind(source)
    if kind == "preset":
        config = _prepare_config(llama_config(str(source), vocab_size=vocab_size), role)
        config._attn_implementation = attn_implementation
        torch.manual_seed(seed)
        return cls(config).to(dtype)
    if kind == "hf":
        config = _prepare_config(read_llama_config(source), role)
        # A scalar head initialised from a causal LM has a new `score` and no `lm_head`; that is the point.
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        # the new score head is initialised from torch's global generator: seed it, or the reward and value
        # models start from a different head in every process (and whatever ran before in this one)
        torch.manual_seed(seed)
        try:
            return cls.from_pretrained(source, config=config, dtype=dtype, attn_implementation=attn_implementation)
        finally:
            hf_logging.set_verbosity(verbosity)
    if kind == "meta":
        from .meta_format import load_meta_checkpoint

        config, state_dict = load_meta_checkpoint(source)
        config = _prepare_config(config, role)
        config._attn_implementation = attn_implementation
        with torch.device("meta"):
            model = cls(config)
        if role in SCALAR_ROLES:
            state_dict = {k: v for k, v in state_dict.items() if not k.startswith("lm_head.")}
            torch.manual_seed(seed)
            score = nn.Linear(config.hidden_size, 1, bias=False)
            nn.init.normal_(score.weight, std=config.initializer_range)
            state_dict["score.weight"] = score.weight.detach()
        model.load_state_dict(state_dict, strict=True, assign=True)
        _materialise_buffers(model, config)
        return model.to(dtype)
    raise AssertionError(kind)


def _materialise_buffers(model: nn.Module, config: LlamaConfig) -> None:
    """A model built on the meta device gets its weights from the state dict, but its non-persistent buffers (the
    RoPE inverse frequencies) are in no state dict: compute them again on the CPU."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    for name, module in list(model.named_modules()):
        if isinstance(module, LlamaRotaryEmbedding):
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, LlamaRotaryEmbedding(config=config))
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"tensors left on the meta device after loading: {left[:5]}")


def read_llama_config(source: str | Path) -> LlamaConfig:
    """A checkpoint directory's config.json as a LlamaConfig; one that is not (a field of the wrong type, bad JSON) is
    refused with the file and transformers' first lines, not its traceback."""
    from transformers import LlamaConfig

    try:
        return LlamaConfig.from_pretrained(source)
    except Exception as err:  # OSError, ValueError, huggingface_hub's StrictDataclassError, ...
        lines = " ".join(str(err).split())[:300]
        raise InputError(f"{Path(source) / 'config.json'}: not a Llama config: {lines}") from err


def saved_role(path: str | Path) -> str | None:
    """The role a checkpoint directory was saved for: ``policy`` (a causal LM) or a scalar role (``reward``,
    ``value``), from our meta file, an adapter's task type or config.json's architecture; None when it says none."""
    path = Path(path)
    if (path / "adapter_config.json").exists():
        return _adapter_role(path)
    role = read_model_meta(path).get("role")
    if role:
        return role
    try:
        archs = json.loads((path / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError):
        return None
    if any(a.endswith("ForCausalLM") for a in archs):
        return "policy"
    return "reward" if any(a.endswith("ForSequenceClassification") for a in archs) else None


def _adapter_role(path: str | Path) -> str:
    """The role an adapter was saved for (our meta file, else PEFT's task type)."""
    role = read_model_meta(path).get("role")
    if role:
        return role
    cfg = json.loads((Path(path) / "adapter_config.json").read_text())
    return "reward" if cfg.get("task_type") == "SEQ_CLS" else "policy"


def _same_family(a: str, b: str) -> bool:
    return (a in SCALAR_ROLES) == (b in SCALAR_ROLES)


def _rehead(causal: PreTrainedModel, role: str, seed: int) -> PreTrainedModel:
    """A causal LM's backbone under a new scalar head (the LM head is dropped, the score head is new)."""
    import torch
    from transformers import LlamaForSequenceClassification

    config = _prepare_config(causal.config, role)
    torch.manual_seed(seed)
    scalar = LlamaForSequenceClassification(config).to(next(causal.parameters()).dtype)
    scalar.model.load_state_dict(causal.model.state_dict())
    return scalar


def _load_full(source: str | Path, role: str, dtype: torch.dtype, vocab_size: int | None, seed: int,
               attn_implementation: str) -> PreTrainedModel:
    """Plain transformers weights for ``role`` from any source; a saved adapter is merged into its base (which may
    itself be an adapter: a PPO adapter on a LoRA SFT checkpoint), across a change of head when needed."""
    if source_kind(source) != "adapter":
        return _load_base(source, role, dtype, vocab_size, seed, attn_implementation)
    from peft import PeftModel

    saved_as = _adapter_role(source)
    if not _same_family(saved_as, role):
        if role not in SCALAR_ROLES:
            raise InputError(f"{source}: a {saved_as} adapter cannot become a {role}")
        return _rehead(_load_full(source, saved_as, dtype, vocab_size, seed, attn_implementation), role, seed)
    base = _load_full(adapter_base(source), role, dtype, vocab_size, seed, attn_implementation)
    return PeftModel.from_pretrained(base, str(source)).merge_and_unload()


def _require_bitsandbytes():
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise ImportError("lora.quantize='nf4' (QLoRA) needs bitsandbytes: pip install 'llama2-align[qlora]' "
                          "(bitsandbytes >= 0.48 has CPU and CUDA 4-bit kernels)") from exc


def bnb_config(compute_dtype: torch.dtype):
    """transformers' quantization config of QLoRA's frozen base: NF4, double-quantized constants."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype, llm_int8_skip_modules=list(QUANT_SKIP_MODULES))


def _quantize_nf4_(model: nn.Module, compute_dtype: torch.dtype, device: torch.device) -> None:
    """Replace the decoder's linear layers of a loaded model by bitsandbytes 4-bit NF4 layers, in place (the path
    for sources that from_pretrained cannot quantize while loading: presets, Meta checkpoints, merged adapters)."""
    import bitsandbytes as bnb
    import torch
    from torch import nn

    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or name.rsplit(".", 1)[-1] in QUANT_SKIP_MODULES:
            continue
        with torch.device("meta"):
            q = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                  compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4")
        q.weight = bnb.nn.Params4bit(module.weight.data, requires_grad=False, compress_statistics=True,
                                     quant_type="nf4")
        if module.bias is not None:
            q.bias = nn.Parameter(module.bias.data, requires_grad=False)
        model.set_submodule(name, q.to(device))  # Params4bit quantizes as it moves


def _load_quantized(source: str | Path, role: str, dtype: torch.dtype, device: torch.device,
                    vocab_size: int | None, seed: int, attn_implementation: str) -> PreTrainedModel:
    """QLoRA's frozen base: the decoder's linear layers in 4-bit NF4 on ``device``, prepared for k-bit training
    (peft's ``prepare_model_for_kbit_training``: everything not quantized in float32, all of it frozen)."""
    from transformers.utils import logging as hf_logging

    _require_bitsandbytes()
    from peft import prepare_model_for_kbit_training

    if source_kind(source) == "hf":  # transformers quantizes tensor by tensor while loading
        config = _prepare_config(read_llama_config(source), role)
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            model = _model_class(role).from_pretrained(
                source, config=config, dtype=dtype, attn_implementation=attn_implementation,
                quantization_config=bnb_config(dtype), device_map={"": str(device)})
        finally:
            hf_logging.set_verbosity(verbosity)
    else:
        model = _load_full(source, role, dtype, vocab_size, seed, attn_implementation)
        _quantize_nf4_(model, dtype, device)
        model.to(device)
    for module in model.modules():
        # bitsandbytes' packed CPU inference kernel needs output sizes that are multiples of 32 and repacks the
        # weights in place on the first no-grad call; the plain 4-bit kernel serves every shape, in both modes.
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def is_quantized(model: nn.Module) -> bool:
    """True when the model's base holds 4-bit (bitsandbytes) layers."""
    return any(type(m).__name__ == "Linear4bit" for m in model.modules())


def _load_model(source, role, dtype, device, vocab_size, seed, attn_implementation, quantize: str):
    if quantize == "nf4":
        return _load_quantized(source, role, dtype, device, vocab_size, seed, attn_implementation)
    return _load_full(source, role, dtype, vocab_size, seed, attn_implementation)


def build_model(
    source: str | Path,
    role: Role = "policy",
    *,
    lora: LoraSettings | None = None,
    dtype: str | torch.dtype | None = "auto",
    device: str | torch.device | None = "auto",
    vocab_size: int | None = None,
    seed: int = 0,
    gradient_checkpointing: bool = False,
    attn_implementation: str = "sdpa",
    continue_adapter: bool = True,
    quantize: Quantize | None = None,
) -> nn.Module:
    """The one factory for every role.

    ``source`` is a preset name (random init, for the demo), an HF-format directory, a Meta-format directory, or a
    saved LoRA adapter. ``lora`` wraps the model in new LoRA adapters (ignored for the reference role: a reference
    is always frozen).

    A saved adapter of the same head family is loaded over its base and stays trainable (resume, inference) when
    ``continue_adapter`` and no new LoRA is asked for. Otherwise (a stage that *starts* from an adapter checkpoint,
    or a reward/value model made from a LoRA SFT checkpoint) the adapter is merged into its base first, so new
    adapters sit on top of exactly the input model: with LoRA, "adapters off" is then that model, e.g. the SFT
    policy as PPO's reference, with one copy of the base in memory.

    QLoRA: with ``lora.quantize="nf4"`` the frozen base under the new adapters is 4-bit NF4 (bitsandbytes). A
    continued adapter that was trained so (its saved record says ``"quantize": "nf4"``) is loaded over a 4-bit base
    again. ``quantize`` overrides both (``"none"``: full precision, e.g. to merge and export).
    """
    import torch

    quiet_transformers()
    device = resolve_device(device) if not isinstance(device, torch.device) else device
    torch_dtype = dtype if isinstance(dtype, torch.dtype) else resolve_dtype(dtype, device)
    trainable = role != "reference"
    new_lora = lora is not None and lora.enabled and trainable
    continuing = (source_kind(source) == "adapter" and continue_adapter and not new_lora
                  and _same_family(_adapter_role(source), role))
    if quantize is not None:
        quant = quantize
    elif new_lora:
        quant = lora.quantize
    else:
        quant = read_model_meta(source).get("quantize", "none") if continuing and trainable else "none"
    if quant != "none" and not (new_lora or continuing):
        raise ValueError(f"quantize={quant!r} ({source}, role {role}): a 4-bit base is only for LoRA adapters "
                         "(QLoRA): enable lora, or load a saved adapter")

    if continuing:
        from peft import PeftModel

        base = _load_model(adapter_base(source), role, torch_dtype, device, vocab_size, seed, attn_implementation,
                           quant)
        model = PeftModel.from_pretrained(base, str(source), is_trainable=trainable)
    else:
        model = _load_model(source, role, torch_dtype, device, vocab_size, seed, attn_implementation, quant)
        if new_lora:
            from peft import get_peft_model

            torch.manual_seed(seed)  # the adapters' random init: the same in every process (every rank) for a seed
            model = get_peft_model(model, lora.peft_config(role))

    if gradient_checkpointing and trainable:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    model.to(device)
    if not trainable:
        freeze(model)
    return model


def freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def is_peft(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, PeftModel)


def unwrap(model: nn.Module) -> PreTrainedModel:
    """The transformers model under a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if is_peft(model) else model


class Reference:
    """The frozen reference policy.

    With a LoRA policy it is the policy itself with the adapters disabled: no second copy of the base. Otherwise it
    holds a separate frozen model. Call it like a model; it never builds a graph.
    """

    def __init__(self, policy: nn.Module, frozen: nn.Module | None = None):
        if frozen is None and not is_peft(policy):
            raise ValueError("a full (non-LoRA) policy needs a separate frozen reference model")
        self.policy = policy
        self.frozen = frozen

    @property
    def shares_weights(self) -> bool:
        return self.frozen is None

    @contextlib.contextmanager
    def model(self) -> Iterator[nn.Module]:
        import torch

        with torch.no_grad():
            if self.frozen is not None:
                yield self.frozen
            else:
                with self.policy.disable_adapter():
                    yield self.policy

    def __call__(self, **inputs):
        with self.model() as m:
            return m(**inputs)


def build_reference(policy: nn.Module, source: str | Path, **build_kwargs) -> Reference:
    """The reference for ``policy``: shared weights when it has LoRA adapters, else a frozen copy of ``source``."""
    if is_peft(policy):
        return Reference(policy)
    return Reference(policy, build_model(source, "reference", **build_kwargs))


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


# --------------------------------------------------------------------------------------------------------------
# Saving: the one checkpoint writer
# --------------------------------------------------------------------------------------------------------------


def save_model(model: nn.Module, out_dir: str | Path, tokenizer=None, *, role: str | None = None,
               base: str | Path | None = None, extra_files: dict[str, bytes] | None = None,
               state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write a model directory atomically (temporary directory, then rename) in HF safetensors format.

    A LoRA model is written as its adapter plus a pointer to its base (``base``, which must itself be a saved
    directory; a preset-initialised base is saved by the caller first). Anything already at ``out_dir`` is replaced
    only once the new directory is complete. ``state_dict`` replaces the model's own tensors (a sharded model's,
    gathered: ``fsdp.save_final``).
    """
    from .io import atomic_dir

    quiet_transformers()
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        meta = {"role": role, "adapter": is_peft(model)}
        if is_peft(model):
            meta["quantize"] = "nf4" if is_quantized(model) else "none"  # the base the adapter was trained on
            if base is None:
                raise ValueError("saving a LoRA adapter needs the path of its base model")
            meta["base"] = str(Path(base).resolve()) if Path(base).exists() else str(base)
            model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        else:
            unwrap(model).save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        if tokenizer is not None:
            from .tokenizer import save_tokenizer

            save_tokenizer(tokenizer, tmp)
        (tmp / MODEL_META_FILE).write_text(json.dumps(meta, indent=2))
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
    return out_dir


def merge_lora(model: nn.Module) -> PreTrainedModel:
    """Fold LoRA adapters into the base weights (for export); a model without adapters is returned as it is."""
    return model.merge_and_unload() if is_peft(model) else model


def export_merged(adapter_dir: str | Path, out_dir: str | Path, role: Role = "policy", tokenizer=None) -> Path:
    """Merge a saved adapter into its base and write a plain HF directory."""
    model = build_model(adapter_dir, role, device="cpu", dtype="fp32", quantize="none")
    return save_model(merge_lora(model), out_dir, tokenizer, role=role)
