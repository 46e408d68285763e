"""Meta's original Llama 2 checkpoint format: read it, write it, convert it to an HF directory.

A Meta directory holds ``params.json`` (the shape), ``consolidated.NN.pth`` (one shard per model-parallel rank: 7B
has 1, 13B 2, 70B 8) and ``tokenizer.model``. Each shard holds its rank's slice of every tensor, cut the way Meta's
fairscale layers cut them: ColumnParallelLinear (wq, wk, wv, w1, w3, output) along dim 0, RowParallelLinear (wo, w2)
along dim 1, ParallelEmbedding (tok_embeddings) along dim 1; the RMSNorm weights are replicated.

Two differences from HF's Llama besides the names:
- Meta's RoPE rotates interleaved pairs (0,1), (2,3), ... of each head; HF's rotates the two halves. transformers'
  converter permutes the rows of wq/wk so the HF maths gives the same result (:func:`permute`); we do the same, and
  :func:`unpermute` undoes it.
- The FFN width is not stored; it is computed from dim, multiple_of and ffn_dim_multiplier (:func:`ffn_size`).

``.pth`` files are loaded with ``torch.load(weights_only=True)`` only: a shard that pickles anything but tensors and
plain containers is refused.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

from .errors import InputError, InputNotFoundError

PARAMS_FILE = "params.json"
SHARD_GLOB = "consolidated.*.pth"
_SHARD_RE = re.compile(r"^consolidated\.(\d+)\.pth$")

# Meta name suffix -> the dim its model-parallel shards are cut along (None: replicated).
_SPLIT_DIM = {
    "tok_embeddings.weight": 1,
    "output.weight": 0,
    "norm.weight": None,
    "attention.wq.weight": 0,
    "attention.wk.weight": 0,
    "attention.wv.weight": 0,
    "attention.wo.weight": 1,
    "feed_forward.w1.weight": 0,
    "feed_forward.w2.weight": 1,
    "feed_forward.w3.weight": 0,
    "attention_norm.weight": None,
    "ffn_norm.weight": None,
}

# Meta layer name -> HF layer name.
_LAYER_NAMES = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_TOP_NAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}

LLAMA2_CONTEXT = 4096  # not stored in params.json (Meta passes max_seq_len at build time)


class MetaCheckpointError(InputError):
    """A Meta-format directory that cannot be read: missing files, wrong shard count, inconsistent shapes."""


# --------------------------------------------------------------------------------------------------------------
# Shape helpers
# --------------------------------------------------------------------------------------------------------------


def ffn_size(dim: int, multiple_of: int, ffn_dim_multiplier: float | None = None) -> int:
    """The SwiGLU hidden width, exactly as Meta's ``FeedForward.__init__`` computes it."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def ffn_params(dim: int, intermediate_size: int) -> dict:
    """``multiple_of`` / ``ffn_dim_multiplier`` for params.json that reproduce ``intermediate_size`` under
    :func:`ffn_size` (the inverse; the largest power-of-two ``multiple_of`` that works, like Meta's 256)."""
    for multiple_of in (256, 128, 64, 32, 16, 8, 4, 2, 1):
        if ffn_size(dim, multiple_of) == intermediate_size:
            return {"multiple_of": multiple_of}
    # Any width is reachable with multiple_of = the width itself: the rounding then lands on it as long as the
    # (optionally shrunk) hidden size is in (0, width].
    base = int(2 * (4 * dim) / 3)
    out: dict = {"multiple_of": intermediate_size}
    if base > intermediate_size:
        out["ffn_dim_multiplier"] = intermediate_size / base
    if ffn_size(dim, **out) != intermediate_size:  # pragma: no cover - defensive
        raise MetaCheckpointError(f"cannot express ffn width {intermediate_size} for dim {dim} in params.json")
    return out


def permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta (interleaved RoPE pairs) -> HF (rotate-half) row order of a q/k projection; as transformers' converter."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of :func:`permute` (HF -> Meta)."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def _split_dim(meta_name: str) -> int | None:
    for suffix, dim in _SPLIT_DIM.items():
        if meta_name == suffix or meta_name.endswith("." + suffix):
            return dim
    raise MetaCheckpointError(f"unexpected tensor {meta_name!r} in a Meta checkpoint")


def _is_rope_buffer(name: str) -> bool:
    # Some Meta checkpoints carry the precomputed RoPE frequencies; HF recomputes them.
    return name.endswith("rope.freqs") or name.endswith("inner_attention.rope.freqs")


# --------------------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------------------


def is_meta_checkpoint(path: str | Path) -> bool:
    """True for a directory in Meta's format (it has ``params.json``)."""
    p = Path(path)
    return p.is_dir() and (p / PARAMS_FILE).is_file()


def shard_files(path: str | Path) -> list[Path]:
    """The ``consolidated.NN.pth`` shards in rank order; an error unless they are numbered 00..N-1."""
    path = Path(path)
    found = {}
    for f in path.glob(SHARD_GLOB):
        m = _SHARD_RE.match(f.name)
        if m:
            found[int(m.group(1))] = f
    if not found:
        raise MetaCheckpointError(f"{path}: no consolidated.NN.pth shards")
    if sorted(found) != list(range(len(found))):
        raise MetaCheckpointError(
            f"{path}: shards must be numbered consolidated.00.pth .. consolidated.{len(found) - 1:02d}.pth, "
            f"found {', '.join(f.name for _, f in sorted(found.items()))}"
        )
    return [found[i] for i in range(len(found))]


def read_params(path: str | Path) -> dict:
    params_file = Path(path) / PARAMS_FILE
    if not Path(path).is_dir():
        raise InputNotFoundError(f"Meta checkpoint directory not found: {path}")
    if not params_file.is_file():
        raise MetaCheckpointError(f"{path}: no {PARAMS_FILE} (not a Meta-format checkpoint)")
    try:
        params = json.loads(params_file.read_text())
    except json.JSONDecodeError as e:
        raise MetaCheckpointError(f"{params_file}: not valid JSON: {e}") from None
    missing = [k for k in ("dim", "n_layers", "n_heads") if k not in params]
    if missing:
        raise MetaCheckpointError(f"{params_file}: missing {', '.join(missing)}")
    return params


def _load_shard(f: Path) -> dict[str, torch.Tensor]:
    try:
        sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # an old (non-zip) serialisation cannot be mmapped
        try:
            sd = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:
            raise MetaCheckpointError(f"{f}: refused or unreadable with weights_only=True: {e}") from None
    except Exception as e:  # pickle.UnpicklingError for anything that is not plain tensors
        raise MetaCheckpointError(f"{f}: refused or unreadable with weights_only=True: {e}") from None
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise MetaCheckpointError(f"{f}: expected a dict of tensor name -> tensor")
    return sd


def _merge_shards(shards: list[dict[str, torch.Tensor]], files: list[Path]) -> dict[str, torch.Tensor]:
    names = set(shards[0])
    for f, sd in zip(files[1:], shards[1:]):
        if set(sd) != names:
            diff = sorted(names.symmetric_difference(sd))[:5]
            raise MetaCheckpointError(f"{f.name}: holds different tensors from {files[0].name} (e.g. {diff})")
    merged = {}
    for name in sorted(names):
        if _is_rope_buffer(name):
            continue
        parts = [sd[name] for sd in shards]
        dim = _split_dim(name)
        if dim is None or len(parts) == 1:
            if any(p.shape != parts[0].shape for p in parts):
                raise MetaCheckpointError(f"{name}: replicated tensor has different shapes across shards")
            merged[name] = parts[0]
            continue
        other = [s for i, s in enumerate(parts[0].shape) if i != dim]
        for f, p in zip(files, parts):
            if p.dim() != 2 or [s for i, s in enumerate(p.shape) if i != dim] != other:
                raise MetaCheckpointError(
                    f"{name} in {f.name}: shape {tuple(p.shape)} does not fit the other shards' "
                    f"{tuple(parts[0].shape)} (split along dim {dim})"
                )
        merged[name] = torch.cat(parts, dim=dim)
    return merged


def _expect(name: str, t: torch.Tensor | None, shape: tuple[int, ...]) -> torch.Tensor:
    if t is None:
        raise MetaCheckpointError(f"missing tensor {name!r}")
    if tuple(t.shape) != shape:
        raise MetaCheckpointError(
            f"{name}: shape {tuple(t.shape)} does not match params.json (expected {shape}; "
            "a missing or extra shard, or params.json from another model?)"
        )
    return t


def meta_config(params: dict, vocab_size: int) -> "LlamaConfig":  # noqa: F821
    """The transformers config of a Meta ``params.json``, with the Llama 2 constants of :mod:`llama2_align.model`."""
    from transformers import LlamaConfig

    from .model import LLAMA2_COMMON

    dim, n_heads = int(params["dim"]), int(params["n_heads"])
    n_kv = int(params.get("n_kv_heads") or n_heads)
    if dim % n_heads or n_heads % n_kv or (dim // n_heads) % 2:
        raise MetaCheckpointError(f"params.json: dim {dim}, n_heads {n_heads}, n_kv_heads {n_kv} are inconsistent")
    common = dict(LLAMA2_COMMON)
    common["rms_norm_eps"] = float(params.get("norm_eps", common["rms_norm_eps"]))
    common["rope_theta"] = float(params.get("rope_theta", common["rope_theta"]))
    return LlamaConfig(
        **common,
        hidden_size=dim,
        num_hidden_layers=int(params["n_layers"]),
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv,
        intermediate_size=ffn_size(dim, int(params.get("multiple_of", 256)), params.get("ffn_dim_multiplier")),
        vocab_size=vocab_size,
        max_position_embeddings=int(params.get("max_position_embeddings", LLAMA2_CONTEXT)),
    )


def load_meta_checkpoint(path: str | Path) -> tuple["LlamaConfig", dict[str, torch.Tensor]]:  # noqa: F821
    """Read a Meta-format directory into a transformers ``LlamaConfig`` and an HF ``LlamaForCausalLM`` state dict.

    Shards are merged along their model-parallel split, names mapped to HF's and the q/k rows permuted for HF's
    rotate-half RoPE. Tensors keep their stored dtype (bf16 for Meta's releases).
    """
    path = Path(path)
    params = read_params(path)
    files = shard_files(path)
    n_shards = params.get("n_shards") or params.get("model_parallel_size")
    if n_shards is not None and int(n_shards) != len(files):
        raise MetaCheckpointError(f"{path}: params.json says {n_shards} shards, found {len(files)}")
    shards = [_load_shard(f) for f in files]
    meta = _merge_shards(shards, files)
    del shards

    emb = meta.get("tok_embeddings.weight")
    if emb is None:
        raise MetaCheckpointError(f"{path}: missing tensor 'tok_embeddings.weight'")
    vocab = int(params.get("vocab_size", -1))
    if vocab <= 0:  # Meta's releases say -1: the vocabulary is the tokenizer's, which is the embedding's rows
        vocab = int(emb.shape[0])
    config = meta_config(params, vocab)

    dim, n_layers = config.hidden_size, config.num_hidden_layers
    n_heads, n_kv = config.num_attention_heads, config.num_key_value_heads
    head_dim, ffn = dim // n_heads, config.intermediate_size
    kv_dim = head_dim * n_kv
    if len(files) > 1 and (n_heads % len(files) or n_kv % len(files)):
        raise MetaCheckpointError(
            f"{path}: {len(files)} shards cannot split {n_heads} heads / {n_kv} KV heads evenly"
        )

    sd: dict[str, torch.Tensor] = {}
    for name, hf in _TOP_NAMES.items():
        shape = (vocab, dim)
        sd[hf] = _expect(name, meta.pop(name, None), shape if name != "norm.weight" else (dim,))
    layer_shapes = {
        "attention.wq.weight": (dim, dim),
        "attention.wk.weight": (kv_dim, dim),
        "attention.wv.weight": (kv_dim, dim),
        "attention.wo.weight": (dim, dim),
        "feed_forward.w1.weight": (ffn, dim),
        "feed_forward.w2.weight": (dim, ffn),
        "feed_forward.w3.weight": (ffn, dim),
        "attention_norm.weight": (dim,),
        "ffn_norm.weight": (dim,),
    }
    for i in range(n_layers):
        for name, shape in layer_shapes.items():
            full = f"layers.{i}.{name}"
            t = _expect(full, meta.pop(full, None), shape)
            if name == "attention.wq.weight":
                t = permute(t, n_heads)
            elif name == "attention.wk.weight":
                t = permute(t, n_kv)
            sd[f"model.layers.{i}.{_LAYER_NAMES[name]}"] = t.contiguous()
    if meta:
        extra = sorted(meta)[:5]
        raise MetaCheckpointError(f"{path}: unexpected tensors for a {n_layers}-layer model: {extra}")
    return config, sd


# --------------------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------------------


def write_meta_checkpoint(model, out_dir: str | Path, num_shards: int = 1,
                          tokenizer_model: str | Path | None = None) -> Path:
    """Write a ``LlamaForCausalLM`` (or a PEFT wrapper of one: adapters are *not* merged) in Meta's format.

    The inverse of :func:`load_meta_checkpoint`: q/k rows un-permuted, tensors cut into ``num_shards`` model-parallel
    shards, ``params.json`` written so Meta's code rebuilds the same shape, ``tokenizer.model`` copied when given.
    The directory is written atomically.
    """
    from transformers import LlamaForCausalLM

    from .io import atomic_dir
    from .model import unwrap

    model = unwrap(model)
    if not isinstance(model, LlamaForCausalLM):
        raise TypeError(f"expected a LlamaForCausalLM, got {type(model).__name__}")
    cfg = model.config
    dim, n_heads = cfg.hidden_size, cfg.num_attention_heads
    n_kv = cfg.num_key_value_heads or n_heads
    if num_shards < 1 or n_heads % num_shards or n_kv % num_shards:
        raise InputError(f"num_shards={num_shards} must divide the {n_heads} heads and {n_kv} KV heads")
    if cfg.vocab_size % num_shards or cfg.intermediate_size % num_shards or dim % num_shards:
        raise InputError(f"num_shards={num_shards} must divide vocab, hidden and ffn sizes")
    if getattr(cfg, "head_dim", None) not in (None, dim // n_heads):
        raise InputError("Meta's format needs head_dim == hidden_size // num_attention_heads")

    hf = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if getattr(cfg, "tie_word_embeddings", False) or "lm_head.weight" not in hf:
        hf["lm_head.weight"] = hf["model.embed_tokens.weight"]
    meta: dict[str, torch.Tensor] = {}
    for name, hf_name in _TOP_NAMES.items():
        meta[name] = hf[hf_name]
    hf_to_meta = {v: k for k, v in _LAYER_NAMES.items()}
    for i in range(cfg.num_hidden_layers):
        for hf_suffix, name in hf_to_meta.items():
            t = hf[f"model.layers.{i}.{hf_suffix}"]
            if name == "attention.wq.weight":
                t = unpermute(t, n_heads)
            elif name == "attention.wk.weight":
                t = unpermute(t, n_kv)
            meta[f"layers.{i}.{name}"] = t

    rope_theta = (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    params = {"dim": dim, "n_layers": cfg.num_hidden_layers, "n_heads": n_heads}
    if n_kv != n_heads:
        params["n_kv_heads"] = n_kv
    params.update(ffn_params(dim, cfg.intermediate_size))
    params["norm_eps"] = cfg.rms_norm_eps
    params["vocab_size"] = cfg.vocab_size
    if float(rope_theta) != 10000.0:
        params["rope_theta"] = float(rope_theta)  # Code Llama's key; Llama 2 itself has none

    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        for rank in range(num_shards):
            shard = {}
            for name, t in meta.items():
                dim_ = _split_dim(name)
                shard[name] = t.clone() if dim_ is None else t.chunk(num_shards, dim=dim_)[rank].clone()
            torch.save(shard, tmp / f"consolidated.{rank:02d}.pth")
        (tmp / PARAMS_FILE).write_text(json.dumps(params, indent=2) + "\n")
        if tokenizer_model is not None:
            src = Path(tokenizer_model)
            if src.is_dir():
                src = src / "tokenizer.model"
            if not src.is_file():
                raise InputNotFoundError(f"tokenizer.model not found: {tokenizer_model}")
            shutil.copy(src, tmp / "tokenizer.model")
    return out_dir


# --------------------------------------------------------------------------------------------------------------
# Converting (the body of the CLI's `convert` command)
# --------------------------------------------------------------------------------------------------------------


def convert_meta_to_hf(meta_dir: str | Path, out_dir: str | Path, dtype: str = "fp32") -> Path:
    """Convert a Meta-format directory into an HF directory that plain transformers loads
    (``LlamaForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained``). Written atomically."""
    from .model import build_model, save_model
    from .tokenizer import SPM_FILE, load_tokenizer

    meta_dir = Path(meta_dir)
    read_params(meta_dir)
    shard_files(meta_dir)
    spm_file = meta_dir / SPM_FILE
    if not spm_file.is_file():
        raise MetaCheckpointError(f"{meta_dir}: no {SPM_FILE} (Meta's checkpoints ship it beside params.json)")
    tokenizer = load_tokenizer(spm_file)
    model = build_model(meta_dir, "policy", device="cpu", dtype=dtype)
    if len(tokenizer) > model.config.vocab_size:
        raise MetaCheckpointError(
            f"{meta_dir}: tokenizer has {len(tokenizer)} tokens but the embedding only {model.config.vocab_size}"
        )
    return save_model(model, out_dir, tokenizer, role="policy")


def convert_command(meta_dir: str | Path, out_dir: str | Path, dtype: str = "fp32") -> str:
    """What the CLI's ``convert`` prints: converts, then says what it wrote."""
    out = convert_meta_to_hf(meta_dir, out_dir, dtype=dtype)
    cfg = json.loads((Path(out) / "config.json").read_text())
    return (
        f"converted {meta_dir} -> {out}\n"
        f"  layers {cfg['num_hidden_layers']}, hidden {cfg['hidden_size']}, heads {cfg['num_attention_heads']} "
        f"(kv {cfg['num_key_value_heads']}), ffn {cfg['intermediate_size']}, vocab {cfg['vocab_size']}, {dtype}"
    )
