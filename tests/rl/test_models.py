"""PPO's four models: what is shared, what is copied, and that the reward model keeps scoring as its
checkpoint does when the value model shares its backbone."""

from __future__ import annotations

import pytest
import torch

from hpalign.data.collate import pack_batch
from hpalign.data.types import TokenizedExample
from hpalign.models import is_peft_model
from hpalign.rl.models import LoraSettings, build_ppo_models, resolve_reward_checkpoint
from hpalign.train.forward import reward_stats
from tests.test_score import save_reward_checkpoint

LORA = LoraSettings(targets=["DEFAULT"], rank=4, alpha=8, dropout=0.0)
BATCH = pack_batch([TokenizedExample([1, 2, 3], [[4, 5, 6]], "a"), TokenizedExample([7, 8], [[9, 10]], "b")], pad_id=0)


def _build(reward_model, lora):
    return build_ppo_models(model="tiny-random-llama", ref_model=None, reward_model=reward_model, dtype=torch.float32,
                            attn_impl="sdpa", gradient_checkpointing=False, lora=lora, seed=0, no_dropout=True)


def _base_ptrs(module):
    return {p.data_ptr() for name, p in module.named_parameters() if "lora_" not in name}


@pytest.mark.parametrize("rm_lora", [True, False])
def test_lora_value_model_shares_the_reward_backbone_and_the_reward_scores_as_saved(tmp_path, rm_lora):
    saved = save_reward_checkpoint(tmp_path, lora=rm_lora)
    models = _build(str(tmp_path), LORA)
    assert models.reference is None and models.reward is None  # adapter-off policy; adapter-off value model
    assert is_peft_model(models.value.lm) and is_peft_model(models.policy)
    with torch.no_grad():
        expected = reward_stats(saved, BATCH, packed=False).rewards_ER
        with models.value.lm.disable_adapter():
            from hpalign.models import RewardModel

            shared = reward_stats(RewardModel(models.value.lm, models.reward_head), BATCH, packed=False).rewards_ER
        value_start = reward_stats(models.value, BATCH, packed=False).rewards_ER  # new adapter starts at zero
    torch.testing.assert_close(shared, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(value_start, expected, atol=1e-5, rtol=1e-5)
    assert not any(p.requires_grad for p in models.reward_head.parameters())
    assert all(p.requires_grad for p in models.value.value_head.parameters())
    trainable = {n for n, p in models.value.lm.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


def test_full_fine_tuning_holds_separate_frozen_reference_and_reward(tmp_path):
    save_reward_checkpoint(tmp_path, lora=False)
    models = _build(str(tmp_path), None)
    assert models.reference is not None and models.reward is not None and models.reward_head is None
    assert not _base_ptrs(models.reference) & _base_ptrs(models.policy)
    assert not _base_ptrs(models.reward) & _base_ptrs(models.value)
    assert not any(p.requires_grad for p in models.reward.parameters())
    assert not any(p.requires_grad for p in models.reference.parameters())
    head = models.value.lm.get_output_embeddings()
    assert not head.weight.requires_grad  # the value model reads hidden states: its untied LM head is frozen
    torch.testing.assert_close(models.value.value_head.summary.weight, models.reward.value_head.summary.weight)


def test_rule_rewards_only_start_the_value_model_from_the_policy_with_a_fresh_head():
    models = _build(None, LORA)
    assert models.reward is None and models.reward_head is None
    head = models.value.value_head.summary
    assert not head.weight.abs().sum() and not head.bias.abs().sum() and head.weight.requires_grad  # V = 0
    policy_base = dict(models.policy.get_base_model().named_parameters())
    for name, param in models.value.lm.get_base_model().named_parameters():
        if "lora_" not in name:
            torch.testing.assert_close(param, policy_base[name])


def test_a_run_directory_means_its_latest_checkpoint(tmp_path):
    for step in (2, 10):
        save_reward_checkpoint(tmp_path / f"checkpoint-{step}", lora=True)
    assert resolve_reward_checkpoint(str(tmp_path)) == tmp_path / "checkpoint-10"
    with pytest.raises(ValueError, match="no such directory"):
        resolve_reward_checkpoint(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither value_head.safetensors"):
        resolve_reward_checkpoint(str(tmp_path / "empty"))


def test_an_hf_sequence_classification_reward_model_with_a_lora_value_model(tmp_path):
    from hpalign.export import export_seq_cls

    saved = save_reward_checkpoint(tmp_path / "rm", lora=True)
    export_seq_cls(tmp_path / "rm", tmp_path / "hf", pad_token="<|im_start|>", drop_bias=True)
    bias = float(saved.value_head.summary.bias)  # HF's score layer has none: scores are lower by it
    models = _build(str(tmp_path / "hf"), LORA)
    assert is_peft_model(models.value.lm) and models.reward is None
    with torch.no_grad():
        expected = reward_stats(saved, BATCH, packed=False).rewards_ER - bias
        from hpalign.models import RewardModel

        with models.value.lm.disable_adapter():
            shared = reward_stats(RewardModel(models.value.lm, models.reward_head), BATCH, packed=False).rewards_ER
        value_start = reward_stats(models.value, BATCH, packed=False).rewards_ER
    torch.testing.assert_close(shared, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(value_start, expected, atol=1e-5, rtol=1e-5)
