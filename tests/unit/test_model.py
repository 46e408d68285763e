"""The one model module: presets, roles, LoRA, the reference, saving and the dtype/device policy."""

from __future__ import annotations

import re

import pytest
import torch
from transformers import LlamaForCausalLM, LlamaForSequenceClassification

from llama2_align import model as M
from llama2_align.device import resolve_dtype
from llama2_align.model import (DEFAULT_LORA_TARGETS, LoraSettings, build_model, build_reference, describe_preset,
                                export_merged, format_preset_table, merge_lora, save_model, trainable_parameters)

torch.set_num_threads(1)

CPU = dict(device="cpu", dtype="fp32")
VOCAB = 1024  # the micro preset's


def _ids(batch: int = 2, length: int = 7, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=g)


def _out(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    """A saved random micro policy in HF format (the base for every 'from a saved directory' test)."""
    out = tmp_path_factory.mktemp("models") / "policy"
    save_model(build_model("micro", "policy", seed=3, **CPU), out, role="policy")
    return out


@pytest.fixture(scope="module")
def reward_dir(policy_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("models") / "reward"
    save_model(build_model(policy_dir, "reward", seed=4, **CPU), out, role="reward")
    return out


# --------------------------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "preset, params, attention",
    [
        ("llama2-7b", 6_738_415_616, "MHA"),
        ("llama2-13b", 13_015_864_320, "MHA"),
        ("llama2-70b", 68_976_648_192, "GQA (8 KV heads)"),
    ],
)
def test_llama2_parameter_counts_are_exact(preset, params, attention):
    info = describe_preset(preset)
    assert info["parameters"] == params
    assert info["attention"] == attention
    assert info["vocab_size"] == 32000 and info["context_length"] == 4096 and info["head_dim"] == 128
    assert info["weights_bf16_bytes"] == 2 * params


def test_70b_uses_grouped_query_attention_and_paper_shapes():
    info = describe_preset("llama2-70b")
    assert (info["hidden_size"], info["num_layers"], info["num_heads"], info["num_kv_heads"], info["ffn_size"]) == (
        8192, 80, 64, 8, 28672)
    cfg = M.llama_config("llama2-70b")
    assert cfg.rms_norm_eps == 1e-5 and cfg.rope_parameters["rope_theta"] == 10000.0
    assert cfg.hidden_act == "silu" and cfg.tie_word_embeddings is False
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (1, 2, 0)


def test_cpu_presets_are_small():
    assert 0.8e6 <= describe_preset("tiny")["parameters"] <= 1.5e6
    # "small" is ~10M: 9,998,592 at its default 8192 vocab (the demo sets the vocab to the tokenizer's).
    assert 9.9e6 <= describe_preset("small")["parameters"] <= 20e6
    assert M.llama_config("small", vocab_size=16384).vocab_size == 16384
    assert describe_preset("micro")["parameters"] < describe_preset("tiny")["parameters"]


def test_format_preset_table_is_readable():
    text = format_preset_table(describe_preset("llama2-7b"))
    lines = text.splitlines()
    assert any(line.startswith("parameters") and "6,738,415,616 (6.74 B)" in line for line in lines)
    assert any("MHA" in line for line in lines)
    assert "GQA (8 KV heads)" in format_preset_table(describe_preset("llama2-70b"))
    # one row per fact, values in one aligned column
    matches = [re.match(r"^\S+(?: \S+)*\s{2,}(\S.*)$", line) for line in lines]
    assert len(lines) >= 8 and all(matches)
    assert len({m.start(1) for m in matches}) == 1


def test_unknown_preset_and_role_and_missing_source():
    with pytest.raises(ValueError, match="unknown model preset"):
        M.llama_config("llama2-99b")
    with pytest.raises(ValueError, match="unknown role"):
        build_model("micro", "critic", **CPU)
    with pytest.raises(FileNotFoundError, match="neither a preset"):
        build_model("/no/such/model", "policy", **CPU)


def test_directory_that_is_not_a_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a model directory"):
        build_model(tmp_path, "policy", **CPU)


# --------------------------------------------------------------------------------------------------------------
# Roles
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("role", M.ROLES)
def test_every_role_builds_from_a_preset(role):
    model = build_model("micro", role, **CPU)
    ids = _ids()
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    if role in M.SCALAR_ROLES:
        assert isinstance(model, LlamaForSequenceClassification)
        assert logits.shape == (2, 1)
    else:
        assert isinstance(model, LlamaForCausalLM)
        assert logits.shape == (2, 7, VOCAB)
    if role == "reference":
        assert not model.training and not any(p.requires_grad for p in model.parameters())
    else:
        assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("role", M.ROLES)
def test_every_role_builds_from_a_saved_hf_dir(role, policy_dir):
    model = build_model(policy_dir, role, **CPU).eval()
    ids = _ids()
    out = _out(model, ids)
    if role in M.SCALAR_ROLES:
        assert out.shape == (2, 1)
        assert not hasattr(model, "lm_head") and model.score.weight.shape == (1, 64)
        # the backbone is the saved one
        base = build_model(policy_dir, "policy", **CPU)
        assert torch.equal(model.model.embed_tokens.weight, base.model.embed_tokens.weight)
    else:
        assert out.shape == (2, 7, VOCAB)
        assert torch.equal(out, _out(build_model(policy_dir, "policy", **CPU).eval(), ids))


def test_value_model_from_a_reward_model_gives_identical_scores(reward_dir):
    reward = build_model(reward_dir, "reward", **CPU).eval()
    value = build_model(reward_dir, "value", **CPU).eval()
    ids = _ids(3, 9)
    assert torch.equal(_out(reward, ids), _out(value, ids))


def test_scalar_head_reads_the_last_non_pad_token(reward_dir):
    reward = build_model(reward_dir, "reward", **CPU).eval()
    ids = _ids(1, 6)
    padded = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], dim=1)  # pad id 0 on the right
    mask = torch.cat([torch.ones(1, 6), torch.zeros(1, 3)], dim=1).long()
    with torch.no_grad():
        a = reward(input_ids=ids).logits
        b = reward(input_ids=padded, attention_mask=mask).logits
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------------------------
# LoRA and the reference
# --------------------------------------------------------------------------------------------------------------

LORA = LoraSettings(enabled=True, r=4, alpha=8)


def test_lora_defaults_target_all_seven_projections():
    assert LoraSettings().target_modules == [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert DEFAULT_LORA_TARGETS == LoraSettings().target_modules
    model = build_model("micro", "policy", lora=LORA, **CPU)
    wrapped = {name.split(".")[-1] for name, m in model.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == set(DEFAULT_LORA_TARGETS)


@pytest.mark.parametrize("role", ["policy", "reward", "value"])
def test_only_lora_params_are_trainable(role):
    model = build_model("micro", role, lora=LORA, **CPU)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable
    for name in trainable:
        assert "lora_" in name or (role != "policy" and "score" in name), name
    if role != "policy":
        assert any("score" in n for n in trainable)
    n_train, n_total = trainable_parameters(model)
    assert 0 < n_train < n_total / 5


def test_reference_role_ignores_lora():
    ref = build_model("micro", "reference", lora=LORA, **CPU)
    assert not M.is_peft(ref) and not any(p.requires_grad for p in ref.parameters())


def test_reference_of_a_lora_policy_shares_weights_and_gives_base_logits():
    base = build_model("micro", "policy", seed=7, **CPU).eval()
    ids = _ids()
    base_logits = _out(base, ids)
    policy = build_model("micro", "policy", seed=7, lora=LORA, **CPU).eval()
    ref = build_reference(policy, "micro")
    assert ref.shares_weights and ref.frozen is None
    with ref.model() as m:
        assert m is policy
        ref_ptrs = {p.data_ptr() for p in m.parameters()}
    # the reference reads the policy's own storage: no second copy of the base
    assert ref_ptrs == {p.data_ptr() for p in policy.parameters()}
    assert len(ref_ptrs) == len(list(policy.parameters()))
    # Change the adapters: the policy moves, the reference still gives exactly the base model's logits.
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.5)
    assert not torch.allclose(_out(policy, ids), base_logits)
    torch.testing.assert_close(ref(input_ids=ids).logits, base_logits, rtol=0, atol=0)
    # no graph is built through the reference
    assert ref(input_ids=ids).logits.grad_fn is None


def test_reference_of_a_full_policy_is_a_frozen_copy():
    policy = build_model("micro", "policy", **CPU)
    ref = build_reference(policy, "micro", **CPU)
    assert not ref.shares_weights
    assert not any(p.requires_grad for p in ref.frozen.parameters())
    pol = {p.data_ptr() for p in policy.parameters()}
    assert pol.isdisjoint(p.data_ptr() for p in ref.frozen.parameters())
    with pytest.raises(ValueError, match="separate frozen reference"):
        M.Reference(policy)


def _perturb_lora(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n or "modules_to_save" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.mark.parametrize("role", ["policy", "reward"])
def test_adapter_save_load_round_trip(role, policy_dir, tmp_path):
    model = build_model(policy_dir, role, lora=LORA, **CPU)
    _perturb_lora(model)
    model.eval()  # LoRA dropout
    ids = _ids()
    before = _out(model, ids)
    out = save_model(model, tmp_path / "adapter", role=role, base=policy_dir)
    assert (out / "adapter_config.json").exists() and not (out / "model.safetensors").exists()
    assert M.source_kind(out) == "adapter" and M.adapter_base(out) == str(policy_dir.resolve())
    loaded = build_model(out, role, **CPU).eval()
    assert M.is_peft(loaded)
    assert torch.equal(_out(loaded, ids), before)
    assert any(p.requires_grad for p in loaded.parameters())  # a trainable role stays trainable
    frozen = build_model(out, "reference", **CPU) if role == "policy" else None
    if frozen is not None:
        assert not any(p.requires_grad for p in frozen.parameters())


def test_saving_an_adapter_needs_its_base(tmp_path):
    model = build_model("micro", "policy", lora=LORA, **CPU)
    with pytest.raises(ValueError, match="base"):
        save_model(model, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("role", ["policy", "reward"])
def test_merge_and_export_give_the_adapter_model_logits(role, policy_dir, tmp_path):
    model = build_model(policy_dir, role, lora=LORA, **CPU)
    _perturb_lora(model, seed=1)
    model.eval()
    ids = _ids()
    expected = _out(model, ids)
    adapter = save_model(model, tmp_path / "adapter", role=role, base=policy_dir)
    merged = merge_lora(model)
    assert not M.is_peft(merged)
    torch.testing.assert_close(_out(merged, ids), expected, rtol=1e-5, atol=1e-5)
    out = export_merged(adapter, tmp_path / "merged", role=role)
    assert M.source_kind(out) == "hf"
    reloaded = build_model(out, role, **CPU).eval()
    assert not M.is_peft(reloaded)
    torch.testing.assert_close(_out(reloaded, ids), expected, rtol=1e-5, atol=1e-5)


def test_merge_lora_passes_a_plain_model_through():
    model = build_model("micro", "policy", **CPU)
    assert merge_lora(model) is model


# --------------------------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------------------------


def test_save_model_writes_safetensors_and_role(tmp_path):
    model = build_model("micro", "value", **CPU)
    out = save_model(model, tmp_path / "v", role="value")
    assert (out / "model.safetensors").exists() and (out / "config.json").exists()
    assert M.read_model_meta(out) == {"role": "value", "adapter": False}
    assert [p.name for p in tmp_path.iterdir()] == ["v"]


def test_save_model_is_atomic(tmp_path, monkeypatch):
    model = build_model("micro", "policy", **CPU)

    def boom(self, *a, **k):
        (a[0] / "model.safetensors").write_bytes(b"half")  # something half-written first
        raise OSError("disk full")

    monkeypatch.setattr(type(model), "save_pretrained", boom)
    with pytest.raises(OSError, match="disk full"):
        save_model(model, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []  # neither the target nor a temporary directory


def test_save_model_failure_keeps_the_previous_directory(tmp_path, monkeypatch):
    model = build_model("micro", "policy", **CPU)
    out = save_model(model, tmp_path / "out", role="policy")
    before = sorted(p.name for p in out.iterdir())
    monkeypatch.setattr(type(model), "save_pretrained", lambda self, *a, **k: (_ for _ in ()).throw(OSError("x")))
    with pytest.raises(OSError):
        save_model(model, out)
    assert sorted(p.name for p in out.iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


# --------------------------------------------------------------------------------------------------------------
# dtype / device policy
# --------------------------------------------------------------------------------------------------------------


def test_dtype_policy():
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype(None, "cpu") == torch.float32
    assert resolve_dtype("auto", "cuda") == torch.bfloat16
    assert resolve_dtype("bf16", "cpu") == torch.bfloat16
    assert resolve_dtype("fp32", "cuda") == torch.float32
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("fp8")


def test_build_model_dtype_override(policy_dir):
    assert next(build_model("micro", "policy", device="cpu").parameters()).dtype == torch.float32
    assert next(build_model("micro", "policy", device="cpu", dtype="bf16").parameters()).dtype == torch.bfloat16
    assert next(build_model(policy_dir, "reward", device="cpu", dtype="bf16").parameters()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype"):
        build_model("micro", "policy", device="cpu", dtype="float7")


# --- QLoRA ---------------------------------------------------------------------------------------------------------


def test_qlora_setting_needs_lora():
    assert M.LoraSettings(enabled=True, quantize="nf4").quantize == "nf4"
    assert M.LoraSettings().quantize == "none"
    with pytest.raises(ValueError, match="needs lora.enabled=true"):
        M.LoraSettings(quantize="nf4")
    with pytest.raises(ValueError):
        M.LoraSettings(enabled=True, quantize="int3")


def test_qlora_is_selectable_per_stage_config():
    from llama2_align.stages.ppo import PPOConfig
    from llama2_align.stages.sft import SFTConfig

    assert SFTConfig(lora={"enabled": True, "quantize": "nf4"}).lora.quantize == "nf4"
    with pytest.raises(ValueError, match="lora.quantize"):
        PPOConfig(lora={"quantize": "nf4"})


def test_a_4bit_base_without_lora_is_refused():
    with pytest.raises(ValueError, match="only for LoRA adapters"):
        M.build_model("micro", "policy", quantize="nf4", device="cpu")


def test_qlora_without_bitsandbytes_says_what_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails
    with pytest.raises(ImportError, match=r"llama2-align\[qlora\]"):
        M.build_model("micro", "policy", lora=M.LoraSettings(enabled=True, quantize="nf4"), device="cpu")


def test_qlora_base_is_4bit_and_only_adapters_train():
    pytest.importorskip("bitsandbytes")
    model = M.build_model("micro", "value", lora=M.LoraSettings(enabled=True, quantize="nf4"), dtype="fp32",
                          device="cpu", vocab_size=300)
    assert M.is_quantized(model) and M.is_peft(model)
    names = {type(m).__name__ for m in M.unwrap(model).model.layers[0].modules()}
    assert "Linear4bit" in names
    assert type(M.unwrap(model).score).__name__ != "Linear4bit"  # the heads stay in full precision
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n or "score" in n for n in trained)
    out = model(input_ids=torch.tensor([[1, 5, 9, 2]]))
    out.logits.sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad and "lora_" in n)


@pytest.mark.parametrize("role", ["reward", "value"])
def test_a_new_scalar_head_on_a_saved_policy_depends_on_the_seed_only(role, policy_dir):
    # the score head a reward or value model gets on top of an SFT checkpoint: the same for a seed, whatever ran
    # before in the process (it was drawn from torch's unseeded global generator: a different RM every run)
    a = build_model(policy_dir, role, seed=3).score.weight.detach().clone()
    torch.rand(1000)
    b = build_model(policy_dir, role, seed=3).score.weight.detach().clone()
    c = build_model(policy_dir, role, seed=4).score.weight.detach().clone()
    assert torch.equal(a, b) and not torch.equal(a, c)
