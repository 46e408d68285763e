"""Export a checkpoint for shipping: one plain HF directory, or one GGUF file for llama.cpp.

``export_checkpoint(checkpoint, out, format="hf" | "gguf", gguf_type="f16" | "q8_0")`` takes any policy checkpoint
the project writes: a full HF directory, a LoRA adapter that points at its base (merged here, through
``model.build_model``), or a Meta-format directory.

- ``hf``: merged weights (safetensors), config and tokenizer, with the Llama 2 chat template; plain
  ``transformers.AutoModelForCausalLM`` / ``AutoTokenizer`` load it.
- ``gguf``: written with the ``gguf`` package (llama.cpp's own writer). It carries the ``llama`` architecture's
  hyper-parameters, the tensors under llama.cpp's names (Q/K rows permuted back to Meta's interleaved RoPE layout, as
  llama.cpp's ``convert_hf_to_gguf.py`` does for HF Llama checkpoints), the SentencePiece vocabulary with its scores
  and token types, the special ids, and the chat template, so llama.cpp tokenizes and renders ``[INST]`` exactly as
  :mod:`llama2_align.chat` does.

The result is written atomically: nothing is left at ``out`` if the export fails.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Literal

import numpy as np

from .chat import LLAMA2_CHAT_TEMPLATE_PLAIN
from .errors import InputError

ExportFormat = Literal["hf", "gguf"]
GgufType = Literal["f16", "q8_0"]
FORMATS: tuple[str, ...] = ("hf", "gguf")
GGUF_TYPES: tuple[str, ...] = ("f16", "q8_0")
HF_DTYPES: tuple[str, ...] = ("auto", "fp32", "bf16", "fp16")


class ExportError(InputError):
    """The checkpoint cannot be exported as asked (says which file or field, and what was expected)."""


# --------------------------------------------------------------------------------------------------------------
# The checkpoint: what it is, where its tokenizer and its saved dtype are
# --------------------------------------------------------------------------------------------------------------


def _chain(checkpoint: Path) -> list[Path]:
    """The checkpoint, then its base, its base's base, ... (adapters point at their base), ending at a full model."""
    from .model import adapter_base, source_kind

    chain = [checkpoint]
    while source_kind(chain[-1]) == "adapter":
        base = Path(adapter_base(chain[-1]))
        if not base.is_dir():
            raise ExportError(f"{chain[-1]}: its base model {base} is not a directory (adapters are saved with the "
                              "path of their base; was the base moved?)")
        if base.resolve() in {p.resolve() for p in chain}:
            raise ExportError(f"{chain[-1]}: adapter bases form a loop")
        chain.append(base)
    return chain


def _check_policy(checkpoint: Path) -> None:
    """Refuse a reward/value model: export ships the causal LM."""
    from .model import saved_role, source_kind

    role = saved_role(checkpoint)  # our meta file, an adapter's task type, or config.json's architecture
    if role not in (None, "policy"):
        raise ExportError(f"{checkpoint}: is a {role} model; export takes a policy checkpoint (a causal LM, e.g. "
                          "runs/<run>/ppo/final or sft/final)")
    if source_kind(checkpoint) == "hf":
        archs = json.loads((checkpoint / "config.json").read_text()).get("architectures") or []
        if archs and not any(a.endswith("ForCausalLM") for a in archs):
            raise ExportError(f"{checkpoint}/config.json: architectures is {archs}; expected a causal LM "
                              "(LlamaForCausalLM)")


def _tokenizer_dir(chain: list[Path]) -> Path:
    """The first directory of the chain that holds a tokenizer (stages save it beside every model)."""
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    for path in chain:
        if any((path / n).exists() for n in names):
            return path
    raise ExportError(f"{chain[0]}: no tokenizer (tokenizer.json or tokenizer.model) in the checkpoint"
                      + (" or its base models" if len(chain) > 1 else ""))


def _saved_dtype(chain: list[Path]) -> str:
    """The dtype the full model at the end of the chain was saved in (``fp32`` when it does not say; Meta's
    original checkpoints are bf16)."""
    from .model import source_kind

    full = chain[-1]
    if source_kind(full) == "meta":
        return "bf16"
    cfg = json.loads((full / "config.json").read_text())
    name = str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32")
    return {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}.get(name, "fp32")


def _load(checkpoint: Path, chain: list[Path], device: str):
    """The merged policy (fp32 when LoRA adapters are folded in, else the saved dtype) and its tokenizer."""
    from .model import build_model, freeze, merge_lora
    from .tokenizer import load_tokenizer

    load_dtype = "fp32" if len(chain) > 1 else _saved_dtype(chain)
    model = build_model(checkpoint, "policy", dtype=load_dtype, device=device, continue_adapter=False)
    model = freeze(merge_lora(model))
    tokenizer = load_tokenizer(_tokenizer_dir(chain))
    if len(tokenizer) > model.config.vocab_size:
        raise ExportError(f"{checkpoint}: the tokenizer has {len(tokenizer)} tokens but the model's embedding only "
                          f"{model.config.vocab_size} (config.json vocab_size)")
    return model, tokenizer


def _check_out(out: Path, overwrite: bool, is_file: bool) -> None:
    if is_file and out.is_dir():
        raise ExportError(f"{out}: is a directory; a GGUF export writes one file (e.g. model-f16.gguf)")
    if not out.exists() or overwrite:
        return
    if is_file:
        raise ExportError(f"{out}: exists; pass overwrite=True (--overwrite) to replace it")
    if not out.is_dir() or any(out.iterdir()):
        raise ExportError(f"{out}: exists and is not empty; pass overwrite=True (--overwrite) to replace it")


# --------------------------------------------------------------------------------------------------------------
# HF directory
# --------------------------------------------------------------------------------------------------------------


def _export_hf(model, tokenizer, out: Path, dtype: str) -> dict:
    from .device import dtype_name, resolve_dtype
    from .model import save_model

    target = resolve_dtype(dtype)
    model = model.to(device="cpu", dtype=target)
    tokenizer.chat_template = LLAMA2_CHAT_TEMPLATE_PLAIN
    save_model(model, out, tokenizer, role="policy")
    files = sorted(p.name for p in out.iterdir())
    weights = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    return {"dtype": dtype_name(target), "files": files, "bytes": weights}


# --------------------------------------------------------------------------------------------------------------
# GGUF
# --------------------------------------------------------------------------------------------------------------


def permute_for_gguf(weight: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """HF Llama's q_proj/k_proj rows are ordered for RoPE by halves (``rotate_half``); llama.cpp rotates adjacent
    pairs, as Meta's original weights do. Undo HF's permutation (the same reshape as llama.cpp's converter); for
    k_proj under GQA the heads are the KV heads."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    rows = weight.shape[0]
    return (weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2)
            .reshape(weight.shape))


def sentencepiece_vocab(spm_file: str | Path, vocab_size: int, hf_tokenizer=None) -> tuple[list[bytes], list[float],
                                                                                              list[int], bool]:
    """Tokens, scores and llama.cpp token types from a SentencePiece ``tokenizer.model`` (normal, unknown, control,
    unused, byte), plus its ``add_dummy_prefix``. Ids past the SentencePiece vocabulary are the HF tokenizer's added
    tokens (control when special, else user-defined) or, up to the embedding size, unused ``[PAD<id>]`` rows."""
    import sentencepiece as spm
    from gguf import TokenType
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(spm_file).read_bytes())
    if proto.trainer_spec.model_type not in (1, 2):  # UNIGRAM, BPE: what llama.cpp's "llama" tokenizer reads
        raise ExportError(f"{spm_file}: SentencePiece model type {proto.trainer_spec.model_type} is not BPE or "
                          "unigram; llama.cpp's SentencePiece tokenizer cannot read it")
    sp = spm.SentencePieceProcessor(model_file=str(spm_file))
    n = sp.vocab_size()
    if n > vocab_size:
        raise ExportError(f"{spm_file}: {n} pieces but the model's embedding has only {vocab_size} rows")
    tokens = [f"[PAD{i}]".encode() for i in range(vocab_size)]
    scores = [-1000.0] * vocab_size
    types = [int(TokenType.UNUSED)] * vocab_size
    for i in range(n):
        kind = TokenType.NORMAL
        if sp.is_unknown(i):
            kind = TokenType.UNKNOWN
        elif sp.is_control(i):
            kind = TokenType.CONTROL
        elif sp.is_unused(i):
            kind = TokenType.UNUSED
        elif sp.is_byte(i):
            kind = TokenType.BYTE
        tokens[i], scores[i], types[i] = sp.id_to_piece(i).encode("utf-8"), sp.get_score(i), int(kind)
    if hf_tokenizer is not None:
        for token_id, added in getattr(hf_tokenizer, "added_tokens_decoder", {}).items():
            if n <= token_id < vocab_size:
                tokens[token_id] = added.content.encode("utf-8")
                types[token_id] = int(TokenType.CONTROL if added.special else TokenType.USER_DEFINED)
    return tokens, scores, types, bool(proto.normalizer_spec.add_dummy_prefix)


def _gguf_metadata(writer, config, name: str, file_type: int) -> None:
    import gguf

    rope = getattr(config, "rope_parameters", None) or {}
    rope_type = rope.get("rope_type", "default")
    if rope_type != "default":
        raise ExportError(f"config.json: rope_parameters.rope_type is {rope_type!r}; this exporter writes Llama 2's "
                          "plain RoPE only ('default')")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_name(name)
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _spm_file(chain: list[Path], tokenizer) -> Path:
    """The SentencePiece model of the checkpoint (or, for an adapter saved without it, of its base), checked
    against the tokenizer: the same piece at every id."""
    import sentencepiece as spm

    from .tokenizer import SPM_FILE

    found = next((p / SPM_FILE for p in chain if (p / SPM_FILE).is_file()), None)
    if found is None:
        raise ExportError(f"{chain[0]}: no {SPM_FILE}; a GGUF export needs the SentencePiece model (its pieces, "
                          "scores and token types) beside the tokenizer")
    sp = spm.SentencePieceProcessor(model_file=str(found))
    pieces = [sp.id_to_piece(i) for i in range(sp.vocab_size())]
    if tokenizer.convert_ids_to_tokens(list(range(len(pieces)))) != pieces:
        raise ExportError(f"{found}: its pieces differ from the checkpoint's tokenizer (tokenizer.json); "
                          "they must be the same vocabulary")
    return found


def _gguf_tokenizer(writer, tokenizer, chain: list[Path], vocab_size: int) -> dict:
    tokens, scores, types, add_prefix = sentencepiece_vocab(_spm_file(chain, tokenizer), vocab_size, tokenizer)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    for setter, token_id in ((writer.add_bos_token_id, tokenizer.bos_token_id),
                             (writer.add_eos_token_id, tokenizer.eos_token_id),
                             (writer.add_unk_token_id, tokenizer.unk_token_id),
                             (writer.add_pad_token_id, tokenizer.pad_token_id)):
        if token_id is not None:
            setter(int(token_id))
    writer.add_add_bos_token(True)  # Llama 2 starts every exchange with BOS
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(add_prefix)
    writer.add_chat_template(LLAMA2_CHAT_TEMPLATE_PLAIN)
    return {"tokens": len(tokens), "sentencepiece_pieces": sum(1 for t in tokens if not t.startswith(b"[PAD")),
            "add_space_prefix": add_prefix}


def _gguf_tensors(writer, model, gguf_type: str) -> dict:
    """Every weight under llama.cpp's name: norms (1-D) in f32, the matrices in f16 or q8_0. A matrix whose rows
    are not a multiple of q8_0's block (32) stays f16, as in llama.cpp's converter."""
    import gguf

    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    qtype = {"f16": gguf.GGMLQuantizationType.F16, "q8_0": gguf.GGMLQuantizationType.Q8_0}[gguf_type]
    counts: dict[str, int] = {}
    fallback: list[str] = []
    state = model.state_dict()
    for hf_name, tensor in state.items():
        if hf_name == "lm_head.weight" and getattr(config, "tie_word_embeddings", False):
            continue  # llama.cpp reuses token_embd when output.weight is absent
        new_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if new_name is None:
            raise ExportError(f"tensor {hf_name!r} has no llama.cpp name; is this a Llama 2 model?")
        data = tensor.detach().to("cpu").float().numpy()
        if hf_name.endswith("q_proj.weight"):
            data = permute_for_gguf(data, config.num_attention_heads, config.num_attention_heads)
        elif hf_name.endswith("k_proj.weight"):
            data = permute_for_gguf(data, config.num_attention_heads, config.num_key_value_heads)
        if data.ndim <= 1 or new_name.endswith("_norm.weight"):
            kind = gguf.GGMLQuantizationType.F32
            data = np.ascontiguousarray(data, dtype=np.float32)
        else:
            kind = qtype
            try:
                data = gguf.quants.quantize(np.ascontiguousarray(data), kind)
            except gguf.QuantError:
                fallback.append(new_name)
                kind = gguf.GGMLQuantizationType.F16
                data = gguf.quants.quantize(np.ascontiguousarray(data), kind)
        writer.add_tensor(new_name, data, raw_dtype=kind)
        counts[kind.name] = counts.get(kind.name, 0) + 1
    return {"tensors": sum(counts.values()), "tensor_types": counts, "f16_fallback": fallback}


def _export_gguf(model, tokenizer, chain: list[Path], out: Path, gguf_type: str, name: str) -> dict:
    import gguf

    file_type = {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[gguf_type]
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
        _gguf_metadata(writer, model.config, name, int(file_type))
        vocab = _gguf_tokenizer(writer, tokenizer, chain, model.config.vocab_size)
        tensors = _gguf_tensors(writer, model, gguf_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return {"gguf_type": gguf_type, "bytes": out.stat().st_size, **vocab, **tensors}


# --------------------------------------------------------------------------------------------------------------
# The entry point
# --------------------------------------------------------------------------------------------------------------


def export_checkpoint(checkpoint: str | Path, out: str | Path, format: ExportFormat = "hf",
                      gguf_type: GgufType = "f16", *, dtype: str = "auto", overwrite: bool = False,
                      device: str = "cpu", name: str | None = None) -> tuple[Path, dict]:
    """Export a policy checkpoint; returns the path written and a small dict of metadata.

    ``checkpoint``: an HF directory, a saved LoRA adapter (merged into its base) or a Meta-format directory.
    ``out``: the HF directory (``format="hf"``) or the ``.gguf`` file (``format="gguf"``); an existing non-empty
    one is refused unless ``overwrite``. ``dtype`` (HF only): ``auto`` keeps the saved dtype of the base weights.
    ``name``: the GGUF's ``general.name`` (default: the checkpoint's path, e.g. ``ppo/final``).
    """
    from .model import source_kind

    started = time.perf_counter()
    checkpoint, out = Path(checkpoint), Path(out)
    if format not in FORMATS:
        raise ExportError(f"unknown export format {format!r}: expected one of {', '.join(FORMATS)}")
    if format == "gguf" and gguf_type not in GGUF_TYPES:
        raise ExportError(f"unknown GGUF type {gguf_type!r}: expected one of {', '.join(GGUF_TYPES)}")
    if format == "hf" and dtype not in HF_DTYPES:
        raise ExportError(f"unknown dtype {dtype!r}: expected one of {', '.join(HF_DTYPES)}")
    if format == "gguf" and out.suffix != ".gguf":
        raise ExportError(f"{out}: a GGUF export writes one file whose name ends in .gguf (e.g. model-f16.gguf)")
    if not checkpoint.is_dir():
        raise FileNotFoundError(f"{checkpoint}: no such checkpoint directory")
    kind = source_kind(checkpoint)  # FileNotFoundError: not a model directory
    if out.resolve() == checkpoint.resolve() or checkpoint.resolve().is_relative_to(out.resolve()):
        raise ExportError(f"{out}: would replace the checkpoint being exported; choose another output")
    _check_out(out, overwrite, is_file=format == "gguf")
    chain = _chain(checkpoint)
    for path in chain:
        _check_policy(path)
    model, tokenizer = _load(checkpoint, chain, device)
    config = model.config
    meta = {
        "format": format,
        "source": str(checkpoint),
        "source_kind": kind,
        "merged_adapters": len(chain) - 1,
        "base": str(chain[-1]),
        "parameters": sum(p.numel() for p in model.parameters()),
        "layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "heads": config.num_attention_heads,
        "kv_heads": config.num_key_value_heads,
        "vocab_size": config.vocab_size,
        "context_length": config.max_position_embeddings,
        "chat_template": "llama2",
    }
    if format == "hf":
        dtype = _saved_dtype(chain) if dtype == "auto" else dtype
        meta.update(_export_hf(model, tokenizer, out, dtype))
    else:
        default_name = "/".join(checkpoint.resolve().parts[-2:])
        meta.update(_export_gguf(model, tokenizer, chain, out, gguf_type, name or default_name))
    meta["path"] = str(out)
    meta["seconds"] = round(time.perf_counter() - started, 2)
    return out, meta
