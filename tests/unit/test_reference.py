"""The PPO reference policy: shared weights with adapters off for LoRA, a separate frozen copy otherwise."""

from __future__ import annotations

import torch

from llama2_align.model import LoraSettings, build_model, build_reference, save_model, unwrap

torch.set_num_threads(1)
VOCAB = 64


def _ids():
    g = torch.Generator().manual_seed(0)
    return torch.randint(3, VOCAB, (2, 7), generator=g)


def _build(lora: bool):
    return build_model("micro", "policy", lora=LoraSettings(enabled=lora, dropout=0.0) if lora else None,
                       vocab_size=VOCAB, seed=0, device="cpu", dtype="fp32")


def test_lora_reference_shares_weights_and_equals_the_base_model():
    plain = _build(lora=False).eval()  # same seed: the same base weights the LoRA policy wraps
    policy = _build(lora=True).eval()
    ref = build_reference(policy, "unused-for-lora")
    assert ref.shares_weights and ref.frozen is None

    ids = _ids()
    with torch.no_grad():
        base_logits = plain(input_ids=ids).logits
        # Move the adapters off zero so the policy really differs from its base.
        g = torch.Generator().manual_seed(1)
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        policy_logits = policy(input_ids=ids).logits
    assert not torch.allclose(policy_logits, base_logits, atol=1e-3)

    with ref.model() as m:
        assert m is policy  # no second copy of the base
        q = unwrap(m).model.layers[0].self_attn.q_proj.base_layer.weight
        assert q.data_ptr() == unwrap(policy).model.layers[0].self_attn.q_proj.base_layer.weight.data_ptr()
        ref_logits = m(input_ids=ids).logits
        assert not ref_logits.requires_grad
    assert torch.equal(ref_logits, base_logits)
    assert torch.equal(ref(input_ids=ids).logits, base_logits)  # __call__ does the same
    # adapters are back on afterwards
    with torch.no_grad():
        assert torch.equal(policy(input_ids=ids).logits, policy_logits)
    assert any(p.requires_grad for n, p in policy.named_parameters() if "lora_" in n)


def test_full_policy_reference_is_a_separate_frozen_model(tmp_path):
    policy = _build(lora=False)
    save_model(policy, tmp_path / "sft", role="policy")
    ref = build_reference(policy, tmp_path / "sft", device="cpu", dtype="fp32")
    assert not ref.shares_weights and ref.frozen is not None
    frozen = ref.frozen
    assert not frozen.training
    assert all(not p.requires_grad for p in frozen.parameters())
    assert all(p.requires_grad for p in policy.parameters())
    emb_p = unwrap(policy).model.embed_tokens.weight
    emb_r = unwrap(frozen).model.embed_tokens.weight
    assert emb_p.data_ptr() != emb_r.data_ptr()

    ids = _ids()
    policy.eval()
    with torch.no_grad():
        before = policy(input_ids=ids).logits
    out = ref(input_ids=ids).logits
    assert not out.requires_grad
    assert torch.allclose(out, before, atol=1e-5)
    # Training the policy leaves the reference where it was.
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05)
        after = policy(input_ids=ids).logits
    assert not torch.allclose(after, before, atol=1e-3)
    assert torch.equal(ref(input_ids=ids).logits, out)
