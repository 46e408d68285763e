"""Meta's original checkpoint format: sharded round trip, Meta's own maths, conversion to HF, refusals."""

from __future__ import annotations

import copy
import json
import math
import random
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from llama2_align.meta_format import (MetaCheckpointError, convert_command, convert_meta_to_hf, ffn_params, ffn_size,
                                      is_meta_checkpoint, load_meta_checkpoint, meta_config, permute, unpermute,
                                      write_meta_checkpoint)
from llama2_align.model import PRESETS, build_model, llama_config, source_kind
from llama2_align.tokenizer import train_tokenizer

torch.set_num_threads(1)

CPU = dict(device="cpu", dtype="fp32")
VOCAB = 300

# How Meta's fairscale layers cut each tensor across model-parallel ranks (written out independently of the module).
SPLIT = {"tok_embeddings": 1, "output": 0, "wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "wo": 1, "w2": 1}


def _split_of(name: str):
    parts = name.split(".")
    return SPLIT.get(parts[-2])


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    rng = random.Random(0)
    words = "the cat sat on a mat you are a helpful assistant how many apples are in the box".split()
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 9))) + f" {rng.randint(0, 99)}."
             for _ in range(300)]
    return train_tokenizer(texts, tmp_path_factory.mktemp("tok") / "tok", vocab_size=VOCAB)


@pytest.fixture(scope="module")
def source_model():
    """A random micro Llama with GQA (4 heads, 2 KV heads) and the tokenizer's vocab."""
    model = build_model("micro", "policy", vocab_size=VOCAB, seed=11, **CPU).eval()
    assert model.config.num_key_value_heads < model.config.num_attention_heads
    return model


@pytest.fixture(scope="module")
def meta_dir(source_model, tokenizer_dir, tmp_path_factory):
    return write_meta_checkpoint(source_model, tmp_path_factory.mktemp("meta") / "llama-2-micro", num_shards=2,
                                 tokenizer_model=tokenizer_dir / "tokenizer.model")


def _ids(seed=0, batch=2, length=11):
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# --------------------------------------------------------------------------------------------------------------
# Shapes
# --------------------------------------------------------------------------------------------------------------


def test_ffn_size_is_metas_feedforward_rule():
    assert ffn_size(4096, 256) == 11008  # 7B
    assert ffn_size(5120, 256) == 13824  # 13B
    assert ffn_size(8192, 4096, 1.3) == 28672  # 70B


@pytest.mark.parametrize("preset", list(PRESETS))
def test_ffn_params_invert_ffn_size(preset):
    shape = PRESETS[preset]
    params = ffn_params(shape["hidden_size"], shape["intermediate_size"])
    assert ffn_size(shape["hidden_size"], **params) == shape["intermediate_size"]
    assert ffn_size(64, **ffn_params(64, 100)) == 100  # narrower than Meta's rule gives: needs a multiplier


def test_metas_70b_params_json_gives_the_70b_preset():
    params = {"dim": 8192, "multiple_of": 4096, "ffn_dim_multiplier": 1.3, "n_heads": 64, "n_kv_heads": 8,
              "n_layers": 80, "norm_eps": 1e-05, "vocab_size": -1}
    cfg, preset = meta_config(params, 32000), llama_config("llama2-70b")
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "intermediate_size", "vocab_size", "max_position_embeddings", "rms_norm_eps", "bos_token_id",
                "eos_token_id", "pad_token_id", "tie_word_embeddings", "hidden_act"):
        assert getattr(cfg, key) == getattr(preset, key), key
    assert cfg.rope_parameters["rope_theta"] == 10000.0


def test_permute_is_inverted_by_unpermute():
    w = torch.randn(2 * 8, 5)
    assert torch.equal(unpermute(permute(w, 2), 2), w)
    # HF's row order puts the first element of every interleaved pair in the first half of the head
    head = torch.arange(8.0)[:, None]
    assert permute(head, 1).flatten().tolist() == [0, 2, 4, 6, 1, 3, 5, 7]


# --------------------------------------------------------------------------------------------------------------
# The on-disk layout
# --------------------------------------------------------------------------------------------------------------


def test_written_checkpoint_has_metas_layout(meta_dir, source_model):
    assert is_meta_checkpoint(meta_dir) and source_kind(meta_dir) == "meta"
    assert sorted(p.name for p in meta_dir.iterdir()) == [
        "consolidated.00.pth", "consolidated.01.pth", "params.json", "tokenizer.model"]
    params = json.loads((meta_dir / "params.json").read_text())
    assert params["dim"] == 64 and params["n_layers"] == 2 and params["n_heads"] == 4 and params["n_kv_heads"] == 2
    assert params["norm_eps"] == 1e-5 and params["vocab_size"] == VOCAB
    assert ffn_size(64, params["multiple_of"], params.get("ffn_dim_multiplier")) == 172
    s0 = torch.load(meta_dir / "consolidated.00.pth", weights_only=True)
    s1 = torch.load(meta_dir / "consolidated.01.pth", weights_only=True)
    assert set(s0) == set(s1)
    assert s0["tok_embeddings.weight"].shape == (VOCAB, 32)  # ParallelEmbedding: split on dim 1
    assert s0["output.weight"].shape == (VOCAB // 2, 64)  # ColumnParallelLinear: dim 0
    assert s0["layers.0.attention.wq.weight"].shape == (32, 64)
    assert s0["layers.0.attention.wk.weight"].shape == (16, 64)  # one KV head of two per rank
    assert s0["layers.0.attention.wo.weight"].shape == (64, 32)  # RowParallelLinear: dim 1
    assert s0["layers.0.feed_forward.w1.weight"].shape == (86, 64)
    assert s0["layers.0.feed_forward.w2.weight"].shape == (64, 86)
    assert torch.equal(s0["layers.1.ffn_norm.weight"], s1["layers.1.ffn_norm.weight"])  # norms replicated


def _meta_reference_logits(meta_dir: Path, tokens: torch.Tensor) -> torch.Tensor:
    """Meta's ``llama/model.py`` forward (complex RoPE on interleaved pairs, repeat_kv, RMSNorm, SwiGLU) run
    straight on the shards, so the q/k permutation is checked against Meta's maths, not just against its inverse."""
    params = json.loads((meta_dir / "params.json").read_text())
    shards = [torch.load(f, map_location="cpu", weights_only=True)
              for f in sorted(meta_dir.glob("consolidated.*.pth"))]
    w = {k: (shards[0][k] if _split_of(k) is None else torch.cat([s[k] for s in shards], _split_of(k))).float()
         for k in shards[0]}
    dim, n_heads = params["dim"], params["n_heads"]
    n_kv, eps = params.get("n_kv_heads", n_heads), params["norm_eps"]
    hd, (bsz, seqlen) = dim // n_heads, tokens.shape
    freqs = 1.0 / (10000.0 ** (torch.arange(0, hd, 2)[: hd // 2].float() / hd))
    freqs = torch.outer(torch.arange(seqlen).float(), freqs)
    freqs_cis = torch.polar(torch.ones_like(freqs), freqs)

    def rms(x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight

    def rope(x):
        xc = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(xc * freqs_cis[None, :, None, :]).flatten(3)

    mask = torch.full((seqlen, seqlen), float("-inf")).triu(1)
    h = w["tok_embeddings.weight"][tokens]
    for i in range(params["n_layers"]):
        p = f"layers.{i}."
        x = rms(h, w[p + "attention_norm.weight"])
        q = (x @ w[p + "attention.wq.weight"].T).view(bsz, seqlen, n_heads, hd)
        k = (x @ w[p + "attention.wk.weight"].T).view(bsz, seqlen, n_kv, hd)
        v = (x @ w[p + "attention.wv.weight"].T).view(bsz, seqlen, n_kv, hd)
        q, k = rope(q), rope(k)
        k = k.repeat_interleave(n_heads // n_kv, dim=2)
        v = v.repeat_interleave(n_heads // n_kv, dim=2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        scores = F.softmax(q @ k.transpose(2, 3) / math.sqrt(hd) + mask, dim=-1)
        h = h + (scores @ v).transpose(1, 2).reshape(bsz, seqlen, dim) @ w[p + "attention.wo.weight"].T
        x = rms(h, w[p + "ffn_norm.weight"])
        ff = F.silu(x @ w[p + "feed_forward.w1.weight"].T) * (x @ w[p + "feed_forward.w3.weight"].T)
        h = h + ff @ w[p + "feed_forward.w2.weight"].T
    return rms(h, w["norm.weight"]) @ w["output.weight"].T


def test_hf_model_matches_metas_own_maths(meta_dir, source_model):
    ids = _ids(3)
    with torch.no_grad():
        expected = _meta_reference_logits(meta_dir, ids)
    torch.testing.assert_close(_logits(source_model, ids), expected, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------


def test_two_shard_round_trip_gives_identical_logits(meta_dir, source_model):
    config, sd = load_meta_checkpoint(meta_dir)
    assert (config.num_attention_heads, config.num_key_value_heads, config.intermediate_size) == (4, 2, 172)
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id, config.tie_word_embeddings) == (
        1, 2, 0, False)
    src = source_model.state_dict()
    assert set(sd) == set(src)
    for k, v in sd.items():
        assert torch.equal(v, src[k]), k
    loaded = build_model(meta_dir, "policy", **CPU).eval()
    ids = _ids(1)
    assert torch.equal(_logits(loaded, ids), _logits(source_model, ids))


def test_one_shard_and_two_shards_agree(source_model, tmp_path):
    one = write_meta_checkpoint(source_model, tmp_path / "one", num_shards=1)
    _, sd1 = load_meta_checkpoint(one)
    two = write_meta_checkpoint(source_model, tmp_path / "two", num_shards=2)
    _, sd2 = load_meta_checkpoint(two)
    assert all(torch.equal(sd1[k], sd2[k]) for k in sd1)


@pytest.mark.parametrize("role", ["reward", "value", "reference"])
def test_other_roles_load_from_meta_format(meta_dir, source_model, role):
    model = build_model(meta_dir, role, **CPU).eval()
    ids = _ids(2)
    out = _logits(model, ids)
    if role == "reference":
        assert torch.equal(out, _logits(source_model, ids))
        assert not any(p.requires_grad for p in model.parameters())
    else:
        assert out.shape == (2, 1) and torch.isfinite(out).all()
        assert torch.equal(model.model.layers[1].self_attn.k_proj.weight,
                           source_model.model.layers[1].self_attn.k_proj.weight)


def test_bf16_shards_and_vocab_minus_one(source_model, tmp_path):
    """Meta ships bf16 tensors and ``vocab_size: -1``: the vocabulary then comes from the embedding."""
    out = write_meta_checkpoint(copy.deepcopy(source_model).to(torch.bfloat16), tmp_path / "bf16", num_shards=2)
    params = json.loads((out / "params.json").read_text())
    params["vocab_size"] = -1
    (out / "params.json").write_text(json.dumps(params))
    config, sd = load_meta_checkpoint(out)
    assert config.vocab_size == VOCAB and sd["lm_head.weight"].dtype == torch.bfloat16
    model = build_model(out, "policy", **CPU)
    assert next(model.parameters()).dtype == torch.float32
    assert model.model.rotary_emb.inv_freq.device.type == "cpu"


# --------------------------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------------------------


def test_convert_meta_to_hf_loads_with_plain_transformers(meta_dir, source_model, tmp_path):
    import sentencepiece as spm
    from transformers import AutoTokenizer, LlamaForCausalLM

    out = convert_meta_to_hf(meta_dir, tmp_path / "hf")
    assert (out / "model.safetensors").exists() and (out / "tokenizer.model").exists()
    model = LlamaForCausalLM.from_pretrained(out).eval()
    ids = _ids(4)
    torch.testing.assert_close(_logits(model, ids), _logits(source_model, ids), rtol=0, atol=0)
    tok = AutoTokenizer.from_pretrained(out)
    sp = spm.SentencePieceProcessor(model_file=str(meta_dir / "tokenizer.model"))
    assert (tok.bos_token_id, tok.eos_token_id) == (1, 2)
    assert tok("how many apples?")["input_ids"] == [1] + sp.encode("how many apples?")
    chat = [{"role": "user", "content": "how many?"}, {"role": "assistant", "content": "the cat"},
            {"role": "user", "content": "and?"}]
    expected = [1] + sp.encode("[INST] how many? [/INST] the cat ") + [2] + [1] + sp.encode("[INST] and? [/INST]")
    assert tok.apply_chat_template(chat, tokenize=True, return_dict=True)["input_ids"] == expected


def test_convert_command_reports_the_shape(meta_dir, tmp_path):
    text = convert_command(meta_dir, tmp_path / "hf")
    assert "layers 2" in text and "kv 2" in text and f"vocab {VOCAB}" in text
    assert (tmp_path / "hf" / "config.json").exists()


# --------------------------------------------------------------------------------------------------------------
# Refusals and errors
# --------------------------------------------------------------------------------------------------------------


def _mark(path):  # what a malicious shard would run on load
    Path(path).write_text("ran")


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (_mark, (str(self.marker),))


def test_shard_with_a_pickled_object_is_refused(meta_dir, tmp_path):
    bad = _copy(meta_dir, tmp_path / "bad")
    marker = tmp_path / "ran.txt"
    sd = torch.load(bad / "consolidated.01.pth", weights_only=True)
    sd["layers.0.attention.wq.weight"] = _Payload(marker)
    torch.save(sd, bad / "consolidated.01.pth")
    with pytest.raises(MetaCheckpointError, match="weights_only"):
        load_meta_checkpoint(bad)
    with pytest.raises(MetaCheckpointError):
        build_model(bad, "policy", **CPU)
    assert not marker.exists()


def test_missing_params_json(meta_dir, tmp_path):
    bad = _copy(meta_dir, tmp_path / "bad")
    (bad / "params.json").unlink()
    with pytest.raises(MetaCheckpointError, match="params.json"):
        load_meta_checkpoint(bad)
    with pytest.raises(MetaCheckpointError, match="params.json"):
        convert_meta_to_hf(bad, tmp_path / "out")
    assert not is_meta_checkpoint(bad) and not (tmp_path / "out").exists()
    with pytest.raises(FileNotFoundError):
        load_meta_checkpoint(tmp_path / "nowhere")


def test_no_shards(meta_dir, tmp_path):
    bad = _copy(meta_dir, tmp_path / "bad")
    for f in bad.glob("*.pth"):
        f.unlink()
    with pytest.raises(MetaCheckpointError, match="no consolidated"):
        load_meta_checkpoint(bad)
    with pytest.raises(MetaCheckpointError, match="no consolidated"):
        convert_meta_to_hf(bad, tmp_path / "out")


def test_missing_shard(meta_dir, tmp_path):
    bad = _copy(meta_dir, tmp_path / "bad")
    (bad / "consolidated.01.pth").unlink()
    with pytest.raises(MetaCheckpointError, match="missing or extra shard"):
        load_meta_checkpoint(bad)


def test_gap_in_shard_numbers(meta_dir, tmp_path):
    bad = _copy(meta_dir, tmp_path / "bad")
    (bad / "consolidated.01.pth").rename(bad / "consolidated.02.pth")
    with pytest.raises(MetaCheckpointError, match="numbered"):
        load_meta_checkpoint(bad)


def test_shards_with_inconsistent_shapes(meta_dir, tmp_path):
    bad = _copy(meta_dir, tmp_path / "bad")
    sd = torch.load(bad / "consolidated.01.pth", weights_only=True)
    sd["layers.0.attention.wo.weight"] = torch.zeros(60, 32)
    torch.save(sd, bad / "consolidated.01.pth")
    with pytest.raises(MetaCheckpointError, match="wo.weight.*does not fit"):
        load_meta_checkpoint(bad)


def test_params_json_that_does_not_match_the_weights(meta_dir, tmp_path):
    bad = _copy(meta_dir, tmp_path / "bad")
    params = json.loads((bad / "params.json").read_text())
    params["n_layers"] = 3
    (bad / "params.json").write_text(json.dumps(params))
    with pytest.raises(MetaCheckpointError, match="layers.2"):
        load_meta_checkpoint(bad)
    params["n_layers"], params["multiple_of"] = 2, 256
    (bad / "params.json").write_text(json.dumps(params))
    with pytest.raises(MetaCheckpointError, match="does not match params.json"):
        load_meta_checkpoint(bad)


def test_convert_needs_the_tokenizer(meta_dir, tmp_path):
    bad = _copy(meta_dir, tmp_path / "bad")
    (bad / "tokenizer.model").unlink()
    with pytest.raises(MetaCheckpointError, match="tokenizer.model"):
        convert_meta_to_hf(bad, tmp_path / "out")


def test_write_refuses_shard_counts_that_do_not_divide(source_model, tmp_path):
    with pytest.raises(ValueError, match="num_shards"):
        write_meta_checkpoint(source_model, tmp_path / "x", num_shards=3)
    assert not (tmp_path / "x").exists()
