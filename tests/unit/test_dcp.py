"""Distributed checkpoints (llama2_align.dcp) in one process, and the FSDP settings' plumbing (llama2_align.fsdp).

The sharded side (2 gloo processes, FSDP2, resume at another world size) is tests/integration/test_fsdp.py; here:
a LoRA model and its AdamW state round-trip through DCP into freshly built ones, only trainable tensors are stored,
loading runs no pickled code (an index naming any other global is refused), and the Trainer's FSDP arguments are
what accelerate's FSDP2 plugin reads, refused on the CPU where accelerate would silently run DDP.
"""

from __future__ import annotations

import pickle

import pytest
import torch

from llama2_align import dcp, fsdp
from llama2_align.errors import ConfigError
from llama2_align.model import LoraSettings, build_model

LORA = LoraSettings(enabled=True, r=4, alpha=8, dropout=0.0)


def _trained(seed: int):
    model = build_model("micro", "policy", lora=LORA, vocab_size=64, device="cpu", dtype="fp32", seed=seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, betas=(0.9, 0.95))
    ids = torch.randint(3, 64, (2, 12), generator=torch.Generator().manual_seed(seed))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad()
    return model, opt


def test_round_trip_restores_trainable_tensors_and_optimizer(tmp_path):
    model, opt = _trained(seed=1)
    dcp.save(tmp_path / "ckpt", {"policy": (model, opt)})
    assert {p.name for p in (tmp_path / "ckpt").iterdir()} == {".metadata", "__0_0.distcp", "param_groups.json"}

    fresh, fresh_opt = _trained(seed=2)  # other weights, other optimizer state
    dcp.load(tmp_path / "ckpt", {"policy": (fresh, fresh_opt)})
    saved, loaded = model.state_dict(), fresh.state_dict()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(torch.equal(saved[n], loaded[n]) for n in trainable)
    a, b = opt.state_dict(), fresh_opt.state_dict()
    assert a["param_groups"] == [{**g, "betas": tuple(g["betas"])} for g in b["param_groups"]]
    for i, state in a["state"].items():
        assert all(torch.equal(state[k], b["state"][i][k]) for k in ("step", "exp_avg", "exp_avg_sq"))
    # the frozen base is the stage's input, not copied into every checkpoint
    stored = dcp.read_metadata(tmp_path / "ckpt").state_dict_metadata
    assert {k for k in stored if k.startswith("policy.")} == {f"policy.{n}" for n in trainable}
    assert not any("base_layer" in k for k in stored)


class _Payload:
    def __reduce__(self):
        return (print, ("ran code from a checkpoint",))


def test_an_index_naming_other_code_is_refused(tmp_path, capsys):
    model, opt = _trained(seed=1)
    ckpt = dcp.save(tmp_path / "ckpt", {"policy": (model, None)})
    dcp.read_metadata(ckpt)  # DCP's own index reads
    (ckpt / ".metadata").write_bytes(pickle.dumps({"planted": _Payload()}))
    with pytest.raises(pickle.UnpicklingError, match="refusing to load builtins.print"):
        dcp.read_metadata(ckpt)
    fresh, _ = _trained(seed=2)
    with pytest.raises(pickle.UnpicklingError, match="refusing to load builtins.print"):
        dcp.load(ckpt, {"policy": (fresh, None)})
    assert "ran code" not in capsys.readouterr().out


def test_non_tensor_state_is_refused_before_anything_is_written(tmp_path):
    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(2))

        def state_dict(self, *args, **kwargs):
            return {"w": self.w, "note": "text"}

    with pytest.raises(ValueError, match=r"not a tensor, would be pickled: \['note'\]"):
        dcp.save(tmp_path / "ckpt", {"odd": (Odd(), None)})
    assert not (tmp_path / "ckpt" / ".metadata").exists()


def test_fsdp_is_enabled_only_under_a_process_group(monkeypatch):
    from llama2_align import dist
    from llama2_align.stages.ppo import PPOConfig

    assert not fsdp.enabled(PPOConfig(sharding="fsdp"))  # a plain process: nothing to shard over
    monkeypatch.setattr(dist, "is_distributed", lambda: True)
    assert fsdp.enabled(PPOConfig(sharding="fsdp")) and not fsdp.enabled(PPOConfig())
    assert fsdp.build_device(PPOConfig(sharding="fsdp")) == "cpu"


def test_trainer_fsdp_arguments_reach_accelerates_fsdp2_plugin_and_are_refused_on_cpu(monkeypatch, tmp_path):
    from transformers import TrainingArguments

    from llama2_align import dist
    from llama2_align.stages.sft import SFTConfig
    from llama2_align.stages.training import trainer_arguments

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", **fsdp.trainer_arguments())
    plugin = args.fsdp_plugin_args
    assert plugin["fsdp_version"] == 2 and plugin["reshard_after_forward"] is True
    assert plugin["transformer_cls_names_to_wrap"] == "LlamaDecoderLayer"

    monkeypatch.setattr(dist, "is_distributed", lambda: True)
    config = SFTConfig(sharding="fsdp", batch_size=8, micro_batch_size=4)
    with pytest.raises(ConfigError, match="needs GPUs"):
        trainer_arguments(config, tmp_path, n_train=16, has_eval=False)
    assert "fsdp" not in trainer_arguments(config.model_copy(update={"sharding": "ddp"}), tmp_path, 16, False)
