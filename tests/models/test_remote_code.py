"""--trust_remote_code: a model directory that ships its own Python code is refused unless the flag is
on, and with it on the code runs for every model a command loads (policy, reference, reward, value,
tokenizer; training, PPO, score, export). The custom architecture is tiny-random-llama under another
`model_type`, so its outputs can be compared with the plain model's."""

from __future__ import annotations

import json

import pytest
import torch

from hpalign import cli
from hpalign.models import directory_source, load_policy, load_tokenizer, resolve_model
from hpalign.models.reward_model import load_seq_cls_reward_model
from hpalign.models.source import remote_code_reason
from hpalign.rl.models import build_ppo_models
from tests.test_score import save_reward_checkpoint
from tests.tiny_models import CUSTOM_MODEL_TYPE, tiny_custom_code_models, tiny_policy_and_reward

REFUSED = "pass --trust_remote_code true if you trust that code"
INPUT_IDS = torch.tensor([[5, 17, 42, 99, 3]])


@pytest.fixture(scope="module")
def custom(tmp_path_factory):
    """(policy directory, seq-cls reward directory) of the custom-code architecture."""
    return tiny_custom_code_models(tmp_path_factory.mktemp("custom"))


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    return tiny_policy_and_reward(tmp_path_factory.mktemp("plain"))


def test_only_code_transformers_lacks_is_remote_code(plain, tmp_path):
    assert remote_code_reason(plain[0]) is None and remote_code_reason(plain[1]) is None
    # auto_map beside a model_type transformers implements: transformers uses its own class, no code runs
    known = tmp_path / "known"
    known.mkdir()
    (known / "config.json").write_text(json.dumps({"model_type": "llama", "auto_map": {"AutoConfig": "x.Y"}}))
    assert remote_code_reason(known) is None
    tokenizer_only = tmp_path / "tokenizer"
    tokenizer_only.mkdir()
    (tokenizer_only / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "MyOwnTokenizer", "auto_map": {"AutoTokenizer": ["tok.MyOwnTokenizer", None]}}))
    assert "tokenizer_class 'MyOwnTokenizer'" in remote_code_reason(tokenizer_only)
    (tokenizer_only / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "GPT2Tokenizer", "auto_map": {"AutoTokenizer": ["tok.Mine", None]}}))
    assert remote_code_reason(tokenizer_only) is None
    (tokenizer_only / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config.json is not valid JSON"):
        remote_code_reason(tokenizer_only)


def test_custom_code_is_refused_without_the_flag(custom):
    policy_dir, reward_dir = custom
    with pytest.raises(ValueError, match=f"declares model_type '{CUSTOM_MODEL_TYPE}'.*{REFUSED}"):
        resolve_model(str(policy_dir))
    with pytest.raises(ValueError, match=REFUSED):
        directory_source(policy_dir)
    with pytest.raises(ValueError, match=REFUSED):
        load_seq_cls_reward_model(reward_dir, dtype="float32")
    with pytest.raises(ValueError, match=REFUSED):
        build_ppo_models(model=str(policy_dir), ref_model=None, reward_model=None, dtype=torch.float32,
                         attn_impl="sdpa", gradient_checkpointing=False, lora=None, seed=0, no_dropout=True)


def test_the_flag_runs_the_code_and_the_model_computes_as_the_plain_one(custom, plain, caplog):
    source = resolve_model(str(custom[0]), trust_remote_code=True)
    assert source.trust_remote_code and "that code runs in this process" in caplog.text
    model = load_policy(source, dtype="float32")
    assert type(model).__name__ == "CustomLlamaForCausalLM"
    reference = load_policy(resolve_model(str(plain[0])), dtype="float32")
    with torch.no_grad():
        torch.testing.assert_close(model(INPUT_IDS).logits, reference(INPUT_IDS).logits)
    assert load_tokenizer(source).get_vocab() == load_tokenizer(resolve_model(str(plain[0]))).get_vocab()
    reward = load_seq_cls_reward_model(custom[1], dtype="float32", trust_remote_code=True)
    plain_reward = load_seq_cls_reward_model(plain[1], dtype="float32")
    assert type(reward.lm).__name__ == "CustomLlamaForSequenceClassification"
    mask = torch.ones_like(INPUT_IDS)
    with torch.no_grad():
        torch.testing.assert_close(reward.lm(INPUT_IDS, attention_mask=mask).logits,
                                   plain_reward.lm(INPUT_IDS, attention_mask=mask).logits)


def test_ppo_loads_all_four_models_with_the_code(custom):
    policy_dir, reward_dir = custom
    models = build_ppo_models(model=str(policy_dir), ref_model=str(policy_dir), reward_model=str(reward_dir),
                              dtype=torch.float32, attn_impl="sdpa", gradient_checkpointing=False, lora=None, seed=0,
                              no_dropout=True, trust_remote_code=True)
    assert type(models.policy).__name__ == "CustomLlamaForCausalLM"
    assert type(models.reference).__name__ == "CustomLlamaForCausalLM"  # loaded (--ref_model), not copied
    assert type(models.reward.lm).__name__ == "CustomLlamaForSequenceClassification"
    assert type(models.value.lm).__name__ == "CustomLlamaForSequenceClassification"
    critic_free = build_ppo_models(model=str(policy_dir), ref_model=None, reward_model=None, dtype=torch.float32,
                                   attn_impl="sdpa", gradient_checkpointing=False, lora=None, seed=0,
                                   no_dropout=True, with_value=True, trust_remote_code=True)
    assert type(critic_free.value.lm).__name__ == "CustomLlamaForCausalLM"  # a fresh value model: the policy's LM


def test_score_and_export_take_the_flag(custom, tmp_path, capsys):
    """An RM LoRA checkpoint whose base model is the custom directory: scoring and exporting it rebuild
    that base, so both commands refuse without the flag and work with it."""
    checkpoint = tmp_path / "ckpt"
    save_reward_checkpoint(checkpoint, lora=True, state={"model": str(custom[0]), "rlhf_type": "rm",
                                                         "template": "tokenizer"})
    score = ["score", "--checkpoint", str(checkpoint), "--dataset", "builtin-emoji:test", "--max_length", "128"]
    assert cli.main(score) == 2
    assert REFUSED in capsys.readouterr().err
    assert cli.main([*score, "--trust_remote_code"]) == 0
    table = dict(line.rsplit(None, 1) for line in capsys.readouterr().out.splitlines())
    assert table["pairs"] == "64"
    export = ["export", "--checkpoint", str(checkpoint), "--seq_cls", "--output"]
    assert cli.main([*export, str(tmp_path / "refused")]) == 2
    assert REFUSED in capsys.readouterr().err
    assert cli.main([*export, str(tmp_path / "exported"), "--drop_bias", "--trust_remote_code", "true"]) == 0
    exported = tmp_path / "exported"
    assert (exported / "modeling_custom.py").is_file()  # the code travels with the export
    assert remote_code_reason(exported) is not None
    reward = load_seq_cls_reward_model(exported, dtype="float32", trust_remote_code=True)
    assert type(reward.lm).__name__ == "CustomLlamaForSequenceClassification"


@pytest.mark.slow
def test_training_command_takes_the_flag(custom, tmp_path):
    """`hpalign rlhf` with the custom directory as --model and --ref_model (a full fine-tune: both loaded):
    refused with the reason, then trained with --trust_remote_code true; the checkpoint carries the code."""
    from tests.train.conftest import TINY_FLAGS, run_cli, train_records

    flags = [*TINY_FLAGS, "--rlhf_type", "dpo", "--sft_type", "full", "--max_steps", "2", "--batch_size", "2",
             "--output_dir", str(tmp_path), "--run_name", "custom", "--save_steps", "2"]
    flags[flags.index("tiny-random-llama")] = str(custom[0])
    refused = run_cli([*flags, "--ref_model", str(custom[0])], expect_failure=True)
    assert REFUSED in refused.stderr
    run_cli([*flags, "--ref_model", str(custom[0]), "--trust_remote_code", "true", "--run_name", "trusted"])
    run_dir = tmp_path / "trusted"
    assert len(train_records(run_dir)) == 2
    assert (run_dir / "checkpoint-2" / "modeling_custom.py").is_file()
    assert type(load_policy(resolve_model(str(run_dir / "checkpoint-2"), trust_remote_code=True),
                            dtype="float32")).__name__ == "CustomLlamaForCausalLM"
