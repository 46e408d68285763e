"""Export (llama2_align.export): the HF directory reloads in plain transformers with the same logits and chat
template; a LoRA adapter is merged; the GGUF file carries llama.cpp's metadata, names, tensor layout and the
SentencePiece vocabulary (read back with the gguf package's own reader). llama.cpp itself runs in
tests/integration/test_export_llamacpp.py."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import sentencepiece as spm
import torch
from typer.testing import CliRunner

from llama2_align.chat import LLAMA2_CHAT_TEMPLATE_PLAIN, encode_dialog, encode_prompt, render_text
from llama2_align.cli import app
from llama2_align.export import ExportError, export_checkpoint, permute_for_gguf
from llama2_align.model import LoraSettings, build_model, save_model
from llama2_align.tokenizer import SPM_FILE, load_tokenizer, train_tokenizer

CPU = dict(device="cpu", dtype="fp32")
DIALOGS = [
    [{"role": "user", "content": "What color is a banana?"}],
    [{"role": "system", "content": "You are a concise assistant."},
     {"role": "user", "content": "How many apples are in 3 boxes of 12?"}],
    [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Tell me about  two spaces\tand tabs\nand newlines. Ünïcödé 漢字 🙂"}],
]
runner = CliRunner()


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    from llama2_align.demo_world import DemoSizes, generate_demo_world

    return train_tokenizer(generate_demo_world(0, DemoSizes.micro()).corpus_texts(),
                           tmp_path_factory.mktemp("tok") / "tok", vocab_size=512)


@pytest.fixture(scope="module")
def tok(tok_dir):
    return load_tokenizer(tok_dir)


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory, tok):
    """A saved micro policy (random weights, GQA: 4 heads, 2 KV heads) with its SentencePiece tokenizer."""
    out = tmp_path_factory.mktemp("models") / "policy"
    save_model(build_model("micro", "policy", seed=3, vocab_size=len(tok), **CPU), out, tok, role="policy")
    return out


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, policy_dir, tok):
    """A LoRA adapter over policy_dir with non-zero B matrices (a fresh adapter is the identity)."""
    model = build_model(policy_dir, "policy", lora=LoraSettings(enabled=True, r=4, alpha=8, dropout=0.0), **CPU)
    torch.manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    out = tmp_path_factory.mktemp("models") / "adapter"
    save_model(model, out, tok, role="policy", base=policy_dir)
    return out


@pytest.fixture(scope="module")
def gguf_files(tmp_path_factory, policy_dir):
    out = tmp_path_factory.mktemp("gguf")
    return {t: export_checkpoint(policy_dir, out / f"m-{t}.gguf", "gguf", t) for t in ("f16", "q8_0")}


def _logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


# --------------------------------------------------------------------------------------------------------------
# HF
# --------------------------------------------------------------------------------------------------------------


def test_hf_export_loads_in_plain_transformers_with_the_same_logits(tmp_path, policy_dir, tok):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, meta = export_checkpoint(policy_dir, tmp_path / "hf", "hf")
    assert meta["format"] == "hf" and meta["dtype"] == "fp32" and meta["merged_adapters"] == 0
    assert (path / "model.safetensors").is_file() and (path / SPM_FILE).is_file()
    plain = AutoModelForCausalLM.from_pretrained(path).eval()
    ours = build_model(policy_dir, "policy", **CPU).eval()
    ids = encode_prompt(tok, DIALOGS[1])
    assert torch.allclose(_logits(plain, ids), _logits(ours, ids), atol=1e-5, rtol=0)

    plain_tok = AutoTokenizer.from_pretrained(path)
    for dialog in DIALOGS:
        text = plain_tok.apply_chat_template(dialog, tokenize=False)
        assert text == render_text(dialog)
        assert plain_tok.encode(text, add_special_tokens=False) == encode_dialog(tok, dialog).input_ids
    # Plain Jinja (no transformers-only {% generation %} tag), so other renderers read it too.
    assert plain_tok.chat_template == LLAMA2_CHAT_TEMPLATE_PLAIN and "generation" not in plain_tok.chat_template


def test_hf_export_merges_a_lora_adapter_into_its_base(tmp_path, adapter_dir, policy_dir, tok):
    from transformers import AutoModelForCausalLM

    path, meta = export_checkpoint(adapter_dir, tmp_path / "merged", "hf")
    assert meta["merged_adapters"] == 1 and meta["base"] == str(policy_dir.resolve())
    assert not (path / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(path).eval()
    with_adapter = build_model(adapter_dir, "policy", **CPU).eval()  # PEFT model, adapters unmerged
    base = build_model(policy_dir, "policy", **CPU).eval()
    ids = encode_prompt(tok, DIALOGS[0])
    assert torch.allclose(_logits(merged, ids), _logits(with_adapter, ids), atol=1e-5, rtol=0)
    assert not torch.allclose(_logits(merged, ids), _logits(base, ids), atol=1e-3)  # the adapter did something


def test_hf_export_dtype(tmp_path, policy_dir):
    from safetensors import safe_open

    path, meta = export_checkpoint(policy_dir, tmp_path / "bf16", "hf", dtype="bf16")
    assert meta["dtype"] == "bf16"
    with safe_open(path / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}


# --------------------------------------------------------------------------------------------------------------
# GGUF
# --------------------------------------------------------------------------------------------------------------


def _fields(path) -> tuple[dict, dict]:
    reader = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items()}, {t.name: t for t in reader.tensors}


def test_permutation_turns_hf_rope_into_llamacpp_rope():
    """HF Llama rotates q/k by halves (rotate_half); llama.cpp's llama architecture rotates adjacent pairs, as
    Meta's weights do. With the permuted rows, pair-wise RoPE must give the same attention scores, under GQA too."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    torch.manual_seed(0)
    n_head, n_kv, head_dim, hidden, T = 4, 2, 16, 32, 7
    wq, wk = torch.randn(n_head * head_dim, hidden), torch.randn(n_kv * head_dim, hidden)
    x = torch.randn(T, hidden)
    inv = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    ang = torch.arange(T).float()[:, None] * inv[None, :]  # (T, head_dim/2)

    # HF: halves
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    q = (x @ wq.T).view(T, n_head, head_dim).transpose(0, 1)[None]
    k = (x @ wk.T).view(T, n_kv, head_dim).transpose(0, 1)[None]
    q_hf, k_hf = apply_rotary_pos_emb(q, k, cos[None], sin[None])

    # llama.cpp: adjacent pairs (2i, 2i+1) rotated by ang[:, i], on the permuted weights
    def rope_pairs(v):  # (heads, T, head_dim)
        a, b = v[..., 0::2], v[..., 1::2]
        out = torch.empty_like(v)
        out[..., 0::2] = a * ang.cos() - b * ang.sin()
        out[..., 1::2] = a * ang.sin() + b * ang.cos()
        return out

    wq_c = torch.from_numpy(permute_for_gguf(wq.numpy(), n_head, n_head))
    wk_c = torch.from_numpy(permute_for_gguf(wk.numpy(), n_head, n_kv))
    q_c = rope_pairs((x @ wq_c.T).view(T, n_head, head_dim).transpose(0, 1))
    k_c = rope_pairs((x @ wk_c.T).view(T, n_kv, head_dim).transpose(0, 1))
    group = n_head // n_kv
    for h in range(n_head):
        hf_scores = q_hf[0, h] @ k_hf[0, h // group].T
        cpp_scores = q_c[h] @ k_c[h // group].T
        assert torch.allclose(hf_scores, cpp_scores, atol=1e-3), h
    # and without the permutation the scores differ: the test can fail
    q_raw = rope_pairs((x @ wq.T).view(T, n_head, head_dim).transpose(0, 1))
    k_raw = rope_pairs((x @ wk.T).view(T, n_kv, head_dim).transpose(0, 1))
    assert not torch.allclose(q_raw[0] @ k_raw[0].T, q_hf[0, 0] @ k_hf[0, 0].T, atol=1e-1)


def test_gguf_metadata_is_llamas(gguf_files, policy_dir):
    cfg = json.loads((policy_dir / "config.json").read_text())
    for gguf_type, (path, meta) in gguf_files.items():
        kv, _ = _fields(path)
        assert kv["general.architecture"] == "llama"
        assert kv["llama.context_length"] == cfg["max_position_embeddings"] == 512
        assert kv["llama.embedding_length"] == cfg["hidden_size"] == 64
        assert kv["llama.block_count"] == cfg["num_hidden_layers"] == 2
        assert kv["llama.feed_forward_length"] == cfg["intermediate_size"] == 172
        assert kv["llama.attention.head_count"] == 4 and kv["llama.attention.head_count_kv"] == 2
        assert kv["llama.rope.dimension_count"] == 16
        assert kv["llama.rope.freq_base"] == 10000.0
        assert kv["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
        assert kv["llama.vocab_size"] == cfg["vocab_size"] == 512
        assert kv["general.file_type"] == {"f16": 1, "q8_0": 7}[gguf_type]
        assert kv["tokenizer.chat_template"] == LLAMA2_CHAT_TEMPLATE_PLAIN
        assert meta["gguf_type"] == gguf_type and meta["path"] == str(path)


def test_gguf_vocabulary_is_the_sentencepiece_model(gguf_files, tok_dir, tok):
    sp = spm.SentencePieceProcessor(model_file=str(tok_dir / SPM_FILE))
    kv, _ = _fields(gguf_files["f16"][0])
    tokens, scores, types = kv["tokenizer.ggml.tokens"], kv["tokenizer.ggml.scores"], kv["tokenizer.ggml.token_type"]
    assert len(tokens) == len(scores) == len(types) == sp.vocab_size() == 512
    assert tokens == [sp.id_to_piece(i) for i in range(512)]
    assert np.allclose(scores, [sp.get_score(i) for i in range(512)])
    T = gguf.TokenType
    assert (types[0], types[1], types[2]) == (T.UNKNOWN, T.CONTROL, T.CONTROL)
    assert tokens[3:3 + 256] == [f"<0x{b:02X}>" for b in range(256)] and set(types[3:259]) == {T.BYTE}
    assert set(types[259:]) == {T.NORMAL}
    assert (kv["tokenizer.ggml.model"], kv["tokenizer.ggml.pre"]) == ("llama", "default")
    assert (kv["tokenizer.ggml.bos_token_id"], kv["tokenizer.ggml.eos_token_id"]) == (1, 2)
    assert (kv["tokenizer.ggml.unknown_token_id"], kv["tokenizer.ggml.padding_token_id"]) == (0, tok.pad_token_id)
    assert kv["tokenizer.ggml.add_bos_token"] is True and kv["tokenizer.ggml.add_eos_token"] is False
    assert kv["tokenizer.ggml.add_space_prefix"] is True


def test_gguf_tensors_have_llamacpp_names_and_layout(gguf_files, policy_dir):
    from safetensors.torch import load_file

    hf = load_file(policy_dir / "model.safetensors")
    expected = {"token_embd.weight", "output_norm.weight", "output.weight"} | {
        f"blk.{i}.{n}.weight" for i in range(2) for n in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output",
                                                           "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")}
    f16 = _fields(gguf_files["f16"][0])[1]
    assert set(f16) == expected
    G = gguf.GGMLQuantizationType
    assert f16["output_norm.weight"].tensor_type == G.F32 and f16["blk.0.attn_norm.weight"].tensor_type == G.F32
    assert f16["blk.0.attn_q.weight"].tensor_type == G.F16
    # ggml's dimension order is reversed: ne = [in, out]
    assert list(f16["blk.1.attn_k.weight"].shape) == [64, 32] and list(f16["token_embd.weight"].shape) == [64, 512]

    def read(t):
        return gguf.quants.dequantize(t.data, t.tensor_type).reshape(hf_shape(t))

    def hf_shape(t):
        return tuple(reversed([int(n) for n in t.shape]))

    q_hf = hf["model.layers.1.self_attn.q_proj.weight"].numpy()
    k_hf = hf["model.layers.1.self_attn.k_proj.weight"].numpy()
    assert np.allclose(read(f16["blk.1.attn_q.weight"]), permute_for_gguf(q_hf, 4, 4), atol=1e-3)
    assert np.allclose(read(f16["blk.1.attn_k.weight"]), permute_for_gguf(k_hf, 4, 2), atol=1e-3)
    assert not np.allclose(read(f16["blk.1.attn_k.weight"]), k_hf, atol=1e-3)
    assert np.allclose(read(f16["blk.0.ffn_down.weight"]), hf["model.layers.0.mlp.down_proj.weight"].numpy(), atol=1e-3)
    assert np.array_equal(read(f16["output_norm.weight"]), hf["model.norm.weight"].numpy())

    q8 = _fields(gguf_files["q8_0"][0])[1]
    meta = gguf_files["q8_0"][1]
    # ffn_down's rows (172) are not a multiple of q8_0's block (32): kept in f16, as llama.cpp's converter does
    assert meta["f16_fallback"] == ["blk.0.ffn_down.weight", "blk.1.ffn_down.weight"]
    assert q8["blk.0.ffn_down.weight"].tensor_type == G.F16 and q8["blk.0.ffn_up.weight"].tensor_type == G.Q8_0
    assert q8["token_embd.weight"].tensor_type == G.Q8_0 and q8["output.weight"].tensor_type == G.Q8_0
    assert meta["tensor_types"] == {"F32": 5, "Q8_0": 14, "F16": 2}
    up = hf["model.layers.0.mlp.up_proj.weight"].numpy()
    deq = read(q8["blk.0.ffn_up.weight"])
    assert np.abs(deq - up).max() <= np.abs(up).max() / 127 + 1e-6  # q8_0: within one step of its block's scale
    assert gguf_files["q8_0"][1]["bytes"] < gguf_files["f16"][1]["bytes"]


def test_gguf_from_a_lora_adapter_is_the_merged_model(tmp_path, adapter_dir):
    import shutil

    # An adapter saved without tokenizer.model (as PPO's used to be) takes its base's.
    bare = tmp_path / "adapter"
    shutil.copytree(adapter_dir, bare)
    (bare / SPM_FILE).unlink(missing_ok=True)
    path, meta = export_checkpoint(bare, tmp_path / "merged.gguf", "gguf")
    hf_path, _ = export_checkpoint(adapter_dir, tmp_path / "merged-hf", "hf")
    from safetensors.torch import load_file

    up = load_file(hf_path / "model.safetensors")["model.layers.0.mlp.up_proj.weight"].numpy()
    t = _fields(path)[1]["blk.0.ffn_up.weight"]
    assert meta["merged_adapters"] == 1
    assert np.allclose(gguf.quants.dequantize(t.data, t.tensor_type).reshape(up.shape), up, atol=1e-3)


# --------------------------------------------------------------------------------------------------------------
# Refusals: clear errors, nothing written
# --------------------------------------------------------------------------------------------------------------


def test_refuses_a_reward_model(tmp_path, policy_dir):
    reward = tmp_path / "rm"
    save_model(build_model(policy_dir, "reward", **CPU), reward, role="reward")
    with pytest.raises(ExportError, match="is a reward model"):
        export_checkpoint(reward, tmp_path / "out", "hf")
    assert not (tmp_path / "out").exists()
    (reward / "llama2_align_model.json").unlink()  # a reward model from elsewhere: its config.json says so
    with pytest.raises(ExportError, match="is a reward model"):
        export_checkpoint(reward, tmp_path / "out", "hf")
    assert not (tmp_path / "out").exists()


def test_refuses_a_non_empty_output_unless_overwrite(tmp_path, policy_dir):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(ExportError, match="not empty"):
        export_checkpoint(policy_dir, out, "hf")
    assert (out / "keep.txt").exists()
    export_checkpoint(policy_dir, out, "hf", overwrite=True)
    assert (out / "config.json").exists() and not (out / "keep.txt").exists()
    target = tmp_path / "m.gguf"
    target.write_bytes(b"old")
    with pytest.raises(ExportError, match="exists"):
        export_checkpoint(policy_dir, target, "gguf")
    assert target.read_bytes() == b"old"


def test_gguf_needs_the_sentencepiece_model_and_leaves_nothing(tmp_path, policy_dir):
    import shutil

    no_spm = tmp_path / "no_spm"
    shutil.copytree(policy_dir, no_spm)
    (no_spm / SPM_FILE).unlink()
    with pytest.raises(ExportError, match="no tokenizer.model"):
        export_checkpoint(no_spm, tmp_path / "out" / "m.gguf", "gguf")
    assert not any((tmp_path / "out").iterdir())  # not even the temporary file
    with pytest.raises(ExportError, match="ends in .gguf"):
        export_checkpoint(policy_dir, tmp_path / "m.bin", "gguf")
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        export_checkpoint(tmp_path / "missing", tmp_path / "m.gguf", "gguf")


# --------------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------------


def test_cli_export_gguf_and_hf(tmp_path, policy_dir):
    result = runner.invoke(app, ["export", str(policy_dir), str(tmp_path / "m.gguf"), "--format", "gguf",
                                 "--gguf-type", "q8_0"])
    assert result.exit_code == 0, result.output
    assert "q8_0: 21 tensors" in result.output and "kept in f16" in result.output
    assert gguf.GGUFReader(tmp_path / "m.gguf").fields["general.architecture"].contents() == "llama"
    result = runner.invoke(app, ["export", str(policy_dir), str(tmp_path / "hf"), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["files"][:3] == ["chat_template.jinja", "config.json", "generation_config.json"]


@pytest.mark.parametrize("args, code, message", [
    (["{missing}", "{out}"], 1, "no such checkpoint directory"),
    (["{policy}", "{out}/m.bin", "--format", "gguf"], 2, "ends in .gguf"),
    (["{policy}", "{out}", "--format", "ggml"], 2, "'ggml' is not one of"),
    (["{policy}", "{out}/m.gguf", "--format", "gguf", "--gguf-type", "q4_0"], 2, "'q4_0' is not one of"),
    (["{policy}", "{policy}"], 2, "would replace the checkpoint"),
    (["{policy}", "{policy_parent}", "--overwrite"], 2, "would replace the checkpoint"),
    (["{policy}", "{nonempty}"], 1, "not empty; pass --overwrite"),
    (["{reward}", "{out}"], 1, "is a reward model"),
])
def test_cli_export_errors(tmp_path, policy_dir, args, code, message):
    (tmp_path / "nonempty").mkdir()
    (tmp_path / "nonempty" / "f").write_text("x")
    reward = tmp_path / "rm"
    if "{reward}" in args:
        save_model(build_model(policy_dir, "reward", **CPU), reward, role="reward")
    names = dict(missing=tmp_path / "missing", out=tmp_path / "out", policy=policy_dir,
                 nonempty=tmp_path / "nonempty", reward=reward, policy_parent=policy_dir.parent)
    result = runner.invoke(app, ["export", *[a.format(**names) for a in args]])
    assert result.exit_code == code, result.output
    assert message in " ".join(result.output.split())
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists()
