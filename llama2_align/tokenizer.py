"""Tokenizers: load a real Llama 2 ``tokenizer.model``, or train a SentencePiece BPE one for the demo world.

Both end up as a transformers ``LlamaTokenizer`` (legacy SentencePiece behaviour, as Llama 2 ships it) with the
Llama 2 chat template saved beside it, BOS added by default and ``<unk>`` (id 0) as the padding token. Llama 2 has no
pad token; padding with ``<unk>`` keeps EOS meaningful (a scalar head reads the last non-pad token).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable

from .chat import LLAMA2_CHAT_TEMPLATE
from .errors import InputError, InputNotFoundError

SPM_FILE = "tokenizer.model"


#: What a trained tokenizer directory was trained with (vocab size, seed, and the caller's settings).
TRAINED_WITH_FILE = "llama2_align_tokenizer.json"


def _settings_record(vocab_size: int, seed: int, settings: dict | None) -> dict:
    """What ``TRAINED_WITH_FILE`` holds, and what ``ensure_tokenizer`` compares it with."""
    return {"vocab_size": vocab_size, "seed": seed, **(settings or {})}


def trained_with(path: str | Path) -> dict | None:
    """The settings a tokenizer directory was trained with here, or None (not trained by train_tokenizer)."""
    f = Path(path) / TRAINED_WITH_FILE
    return json.loads(f.read_text()) if f.is_file() else None


def ensure_tokenizer(texts: Callable[[], Iterable[str]], out_dir: str | Path, vocab_size: int, seed: int,
                     settings: dict | None = None) -> Path:
    """``out_dir`` as a tokenizer trained with these settings: kept when it already is one, trained (``texts()``)
    when it is missing, replaced when it was trained with other settings (a run's demo data regenerated with another
    seed or vocabulary size must not keep the old tokenizer). A directory that records no settings is kept."""
    if Path(out_dir).exists() and trained_with(out_dir) in (None, _settings_record(vocab_size, seed, settings)):
        return Path(out_dir)
    return train_tokenizer(texts(), out_dir, vocab_size, seed=seed, settings=settings)


def train_tokenizer(texts: Iterable[str], out_dir: str | Path, vocab_size: int = 2048, seed: int = 0,
                    settings: dict | None = None) -> Path:
    """Train a SentencePiece BPE tokenizer with Llama 2's settings and save it as an HF tokenizer directory, with
    what it was trained with (``TRAINED_WITH_FILE``: the vocabulary size, the seed and ``settings``).

    Settings as Llama 2's ``tokenizer.model``: BPE, byte fallback, digits split, unk/bos/eos = 0/1/2, no pad piece,
    identity normalisation with whitespace kept as it is, a dummy prefix space.
    """
    import sentencepiece as spm

    from .io import atomic_dir

    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise InputError("cannot train a tokenizer on an empty corpus")
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        with tempfile.TemporaryDirectory() as work:
            corpus = Path(work) / "corpus.txt"
            corpus.write_text("\n".join(t.replace("\n", " ") for t in texts), encoding="utf-8")
            spm.SentencePieceTrainer.train(
                input=str(corpus),
                model_prefix=str(Path(work) / "tokenizer"),
                vocab_size=vocab_size,
                model_type="bpe",
                byte_fallback=True,
                split_digits=True,
                unk_id=0,
                bos_id=1,
                eos_id=2,
                pad_id=-1,
                normalization_rule_name="identity",
                remove_extra_whitespaces=False,
                add_dummy_prefix=True,
                allow_whitespace_only_pieces=True,
                character_coverage=1.0,
                max_sentence_length=16384,
                num_threads=1,  # deterministic
                minloglevel=2,
            )
            shutil.copy(Path(work) / "tokenizer.model", tmp / SPM_FILE)
        save_tokenizer(load_tokenizer(tmp), tmp)
        (tmp / TRAINED_WITH_FILE).write_text(json.dumps(_settings_record(vocab_size, seed, settings)))
    return out_dir


def load_tokenizer(path: str | Path):
    """Load a tokenizer from a directory (``tokenizer.json`` or ``tokenizer.model``) or a ``tokenizer.model`` file.

    Works offline; never runs remote code.
    """
    from transformers import AutoTokenizer, LlamaTokenizer

    path = Path(path)
    if path.is_file() and path.suffix == ".model":
        with tempfile.TemporaryDirectory() as work:
            shutil.copy(path, Path(work) / SPM_FILE)
            tok = load_tokenizer(work)
        # Remember the file itself, not the copy that is gone now, so save_tokenizer still writes tokenizer.model.
        tok.init_kwargs["llama2_align_spm"] = str(path.resolve())
        tok._llama2_align_spm = str(path.resolve())
        return tok
    if not path.is_dir():
        raise InputNotFoundError(f"tokenizer not found: {path} (expected a directory or a tokenizer.model file)")
    if (path / "tokenizer.json").exists() or (path / "tokenizer_config.json").exists():
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    elif (path / SPM_FILE).exists():
        tok = LlamaTokenizer.from_pretrained(path, legacy=True, add_bos_token=True, add_eos_token=False)
    else:
        raise InputNotFoundError(f"{path}: no tokenizer.json or {SPM_FILE}")
    return _finish(tok, path)


def _finish(tok, source: Path):
    _sentencepiece_prefix_per_segment(tok)
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token if tok.unk_token is not None else tok.eos_token
    if not getattr(tok, "chat_template", None):
        tok.chat_template = LLAMA2_CHAT_TEMPLATE
    spm_file = source / SPM_FILE
    if spm_file.exists():
        tok.init_kwargs["llama2_align_spm"] = str(spm_file)  # remembered so save_tokenizer can copy it
        tok._llama2_align_spm = str(spm_file)
    return tok


def _sentencepiece_prefix_per_segment(tok) -> None:
    """SentencePiece adds its dummy-prefix space at the start of every encode call, and Meta's chat format encodes
    each exchange separately, so the text after a ``<s>`` special token starts with "▁" too. transformers 5 defaults
    to prefixing only the very first segment; restore the per-segment behaviour (Llama 2's ``legacy`` mode)."""
    from tokenizers import pre_tokenizers

    backend = getattr(tok, "backend_tokenizer", None)
    pre = getattr(backend, "pre_tokenizer", None)
    if isinstance(pre, pre_tokenizers.Metaspace) and pre.prepend_scheme != "always":
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=False)
    if isinstance(getattr(backend, "pre_tokenizer", None), pre_tokenizers.Metaspace):
        # Saved as `legacy: true` in tokenizer_config.json: LlamaTokenizer rebuilds its pre-tokenizer from that flag
        # on load, so without it a plain AutoTokenizer.from_pretrained of our directory would be back to "first".
        tok.legacy = True
        tok.init_kwargs["legacy"] = True


def save_tokenizer(tok, out_dir: str | Path) -> Path:
    """Save in HF format, plus the SentencePiece ``tokenizer.model`` when there is one."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # The model's bytes are kept on the tokenizer after the first save: the directory it was saved into may be an
    # atomic_dir's temporary one, renamed away by the time the same tokenizer is saved again (PPO saves the policy,
    # then the value model; every checkpoint saves it too).
    spm_bytes = getattr(tok, "_llama2_align_spm_bytes", None)
    spm_src = getattr(tok, "_llama2_align_spm", None)
    if spm_bytes is None and spm_src and Path(spm_src).exists():
        spm_bytes = Path(spm_src).read_bytes()
    tok.init_kwargs.pop("llama2_align_spm", None)
    tok.save_pretrained(out_dir)
    if spm_bytes is not None:
        (out_dir / SPM_FILE).write_bytes(spm_bytes)
        tok._llama2_align_spm = str(out_dir / SPM_FILE)
        tok._llama2_align_spm_bytes = spm_bytes
    return out_dir
