"""hpalign.config: defaults resolution, validation, and the config files written into run dirs."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from hpalign.cli_args import parse_config
from hpalign.config import (
    PPO_MIN_PROMPT_TOKENS,
    SECTIONS,
    Config,
    PPOConfig,
    config_to_dict,
    dump_config,
    load_config_file,
    resolve_defaults,
    save_config,
    validate,
)


def make(**values: object) -> Config:
    """A Config with flat field overrides, e.g. make(rlhf_type="kto", batch_size=2)."""
    cfg = Config()
    for name, value in values.items():
        section = next(s for s in SECTIONS if any(f.name == name for f in dataclasses.fields(SECTIONS[s])))
        setattr(getattr(cfg, section), name, value)
    return cfg


# --- resolve_defaults ---------------------------------------------------------------------------

@pytest.mark.parametrize(("rlhf_type", "beta"), [
    ("dpo", 0.1), ("kto", 0.1), ("cpo", 0.1), ("orpo", 0.1), ("simpo", 2.0), ("rm", None), ("ppo", None),
    ("sft", None)])
def test_beta_default_per_algorithm(rlhf_type: str, beta: float | None) -> None:
    assert resolve_defaults(make(rlhf_type=rlhf_type)).algorithm.beta == beta


def test_explicit_beta_is_kept() -> None:
    assert resolve_defaults(make(rlhf_type="simpo", beta=2.5)).algorithm.beta == 2.5
    assert resolve_defaults(make(rlhf_type="dpo", beta=0.0)).algorithm.beta == 0.0


@pytest.mark.parametrize(("sft_type", "lr"), [("lora", 1e-4), ("full", 1e-5)])
def test_learning_rate_default_per_sft_type(sft_type: str, lr: float) -> None:
    assert resolve_defaults(make(sft_type=sft_type)).train.learning_rate == lr
    assert resolve_defaults(make(sft_type=sft_type, learning_rate=5e-5)).train.learning_rate == 5e-5


def test_max_tokens_per_batch_defaults_to_one_row_per_micro_batch() -> None:
    assert resolve_defaults(make(max_length=300)).data.max_tokens_per_batch is None  # one row per micro-batch
    assert resolve_defaults(make(max_length=300, max_tokens_per_batch=4096)).data.max_tokens_per_batch == 4096


def test_gradient_checkpointing_default_on_for_full_fine_tuning_or_cuda(monkeypatch) -> None:
    import hpalign.config as config

    monkeypatch.setattr(config, "_has_cuda", lambda: False)
    assert resolve_defaults(make(sft_type="full")).train.gradient_checkpointing is True
    assert resolve_defaults(make(sft_type="lora")).train.gradient_checkpointing is None  # decided from the data
    assert resolve_defaults(make(sft_type="full", gradient_checkpointing=False)).train.gradient_checkpointing is False
    monkeypatch.setattr(config, "_has_cuda", lambda: True)
    assert resolve_defaults(make(sft_type="lora")).train.gradient_checkpointing is True


def test_resolve_defaults_returns_a_new_config_and_is_idempotent() -> None:
    cfg = make(rlhf_type="kto")
    resolved = resolve_defaults(cfg)
    assert cfg.algorithm.beta is None and cfg.train.learning_rate is None  # input untouched
    assert resolved is not cfg and resolved.algorithm is not cfg.algorithm
    assert resolve_defaults(resolved) == resolved


def test_ppo_section_defaults_match_the_document_and_trl() -> None:
    ppo = Config().ppo
    assert ppo == PPOConfig()
    assert (ppo.local_rollout_forward_batch_size, ppo.whiten_rewards, ppo.kl_coef, ppo.cliprange) == (64, False, 0.05, 0.2)
    assert (ppo.vf_coef, ppo.cliprange_value, ppo.gamma, ppo.lam) == (0.1, 0.2, 1.0, 0.95)
    assert ppo.num_sample_generations == 10
    assert (ppo.response_length, ppo.num_ppo_epochs, ppo.num_mini_batches, ppo.temperature) == (53, 4, 1, 0.7)
    assert ppo.reward_model_id_or_path is None and ppo.reward_model_type is None
    assert SECTIONS["ppo"] is PPOConfig


# --- validate -----------------------------------------------------------------------------------

def test_default_config_is_valid_before_and_after_resolution() -> None:
    validate(Config())
    for rlhf_type in ("dpo", "kto", "cpo", "orpo", "simpo", "rm", "ppo", "sft"):
        validate(resolve_defaults(make(rlhf_type=rlhf_type)))


@pytest.mark.parametrize(("values", "expected"), [
    ({"rlhf_type": "dpoo"}, "dpo, kto, cpo, orpo, simpo, rm, ppo, grpo, rloo, reinforce_pp, sft"),
    ({"sft_type": "qlora"}, "--sft_type 'qlora' is not valid; use one of: lora, full"),
    ({"loss_type": "robust"}, "--loss_type 'robust' is not valid; use one of: sigmoid, ipo, hinge"),
    ({"beta": -0.1}, "--beta is -0.1; it must be >= 0"),
    ({"rpo_alpha": -1.0}, "--rpo_alpha is -1.0; it must be >= 0"),
    ({"label_smoothing": 0.5}, "--label_smoothing is 0.5; it must be in [0.0, 0.5)"),
    ({"label_smoothing": -0.1}, "--label_smoothing"),
    ({"batch_size": 0}, "--batch_size is 0; it must be >= 1"),
    ({"gradient_accumulation_steps": 0}, "--gradient_accumulation_steps is 0"),
    ({"warmup_ratio": 1.0}, "--warmup_ratio is 1.0; it must be in [0.0, 1.0)"),
    ({"warmup_ratio": -0.01}, "--warmup_ratio"),
    ({"deepspeed": "zero4"}, "--deepspeed 'zero4' is neither a preset (zero0, zero2, zero3, zero3_offload)"),
    ({"deepspeed": "missing_ds.json"}, "nor an existing .json file"),
    ({"report_to": ["none", "mlflow"]}, "--report_to mlflow is not supported; use none, wandb and/or tensorboard"),
    ({"template": "llama3"}, "--template 'llama3' is not valid; use one of: auto, chatml, tokenizer"),
    ({"logprob_impl": "triton"}, "--logprob_impl 'triton' is not valid; use one of: auto, cuda, torch"),
    ({"split_dataset_ratio": 1.0}, "--split_dataset_ratio is 1.0; it must be in [0.0, 1.0)"),
    ({"max_length": 8}, "--max_length is 8; it must be >= 16"),
    ({"max_length": 512, "max_tokens_per_batch": 256}, "--max_tokens_per_batch 256 is below --max_length 512"),
    ({"learning_rate": 0.0}, "--learning_rate is 0.0; it must be > 0"),
    ({"num_train_epochs": 0.0}, "set --num_train_epochs > 0 or --max_steps > 0"),
    ({"torch_dtype": "fp8"}, "--torch_dtype 'fp8'"),
    ({"lam": 1.5}, "--lam is 1.5; it must be in [0, 1]"),
    ({"temperature": 0.0}, "--temperature is 0.0; it must be > 0"),
    ({"num_ppo_epochs": 0}, "--num_ppo_epochs is 0; it must be >= 1"),
])
def test_validate_rejects_with_actionable_message(values: dict, expected: str) -> None:
    with pytest.raises(ValueError) as info:
        validate(make(**values))
    assert expected in str(info.value)


def test_validate_reports_every_problem_at_once() -> None:
    with pytest.raises(ValueError) as info:
        validate(make(beta=-1.0, batch_size=0, template="x"))
    message = str(info.value)
    assert "--beta" in message and "--batch_size" in message and "--template" in message


def test_deepspeed_json_file_is_accepted(tmp_path: Path) -> None:
    ds = tmp_path / "ds.json"
    ds.write_text("{}")
    validate(make(deepspeed=str(ds)))
    validate(make(deepspeed="zero3_offload"))


def test_max_steps_alone_is_enough_to_train() -> None:
    validate(make(num_train_epochs=0.0, max_steps=10))


def test_ppo_response_length_must_leave_room_for_the_prompt() -> None:
    with pytest.raises(ValueError) as info:
        validate(make(rlhf_type="ppo", max_length=64, response_length=56, attn_impl="eager"))
    message = str(info.value)
    assert "--response_length 56 leaves 8 of --max_length 64 tokens for the prompt (PPO needs more than 8)" in message
    assert "raise --max_length to at least 65 or lower --response_length to at most 55" in message
    assert "--attn_impl eager cannot attend" in message  # every cross-section problem at once
    validate(make(rlhf_type="ppo", max_length=64, response_length=55))  # 9 prompt tokens: enough
    validate(make(rlhf_type="dpo", max_length=64, response_length=56))  # only PPO samples responses
    validate(resolve_defaults(make(rlhf_type="ppo")))  # the defaults (1024, 53) fit


def test_ppo_prompt_minimum_is_the_tokenizers_minimum_budget() -> None:
    from hpalign.data.templates import MIN_PROMPT_TOKENS

    assert PPO_MIN_PROMPT_TOKENS == MIN_PROMPT_TOKENS  # a valid config never fails in tokenize_examples


# --- files --------------------------------------------------------------------------------------

def test_config_to_dict_is_nested_by_section() -> None:
    data = config_to_dict(make(beta=0.3, dataset=["a.jsonl"]))
    assert set(data) == set(SECTIONS)
    assert data["algorithm"]["beta"] == 0.3 and data["data"]["dataset"] == ["a.jsonl"]
    assert data["ppo"]["kl_coef"] == 0.05


@pytest.mark.parametrize("name", ["run.yaml", "run.json", "sub/dir/config.yml"])
def test_saved_config_loads_back_identically_via_config_flag(tmp_path: Path, name: str) -> None:
    cfg = resolve_defaults(make(
        rlhf_type="simpo", beta=2.5, learning_rate=5e-5, dataset=["a.jsonl", "b.parquet"], model="tiny-random-llama",
        lora_target_modules=["ALL"], gradient_checkpointing=False, save_total_limit=2, num_train_epochs=2.0,
        report_to=["tensorboard", "wandb"], run_name=None, kl_coef=0.07, whiten_rewards=True))
    path = save_config(cfg, tmp_path / name)
    assert path.is_file()
    assert parse_config(["--config", str(path)]) == cfg


def test_saved_yaml_is_yaml_and_json_is_json(tmp_path: Path) -> None:
    cfg = resolve_defaults(Config())
    yaml_text = save_config(cfg, tmp_path / "c.yaml").read_text()
    assert "algorithm:\n" in yaml_text and "  beta: 0.1\n" in yaml_text
    json_data = json.loads(save_config(cfg, tmp_path / "c.json").read_text())
    assert json_data == config_to_dict(cfg)
    assert dump_config(cfg, fmt="json").startswith("{")
    with pytest.raises(ValueError, match="use yaml or json"):
        dump_config(cfg, fmt="xml")


def test_load_config_file_reads_toml_yaml_json(tmp_path: Path) -> None:
    (tmp_path / "a.toml").write_text('beta = 0.2\n[train]\nbatch_size = 4\n')
    (tmp_path / "a.yaml").write_text("beta: 0.2\ntrain:\n  batch_size: 4\n")
    (tmp_path / "a.json").write_text('{"beta": 0.2, "train": {"batch_size": 4}}')
    for name in ("a.toml", "a.yaml", "a.json"):
        assert load_config_file(tmp_path / name) == {"beta": 0.2, "train": {"batch_size": 4}}


def test_yaml_exponent_without_dot_is_a_float(tmp_path: Path) -> None:
    # Plain YAML 1.1 reads `1e-5` as the string "1e-5"; users write learning rates that way.
    (tmp_path / "lr.yaml").write_text("learning_rate: 1e-5\nbeta: 2\nrun_name: 1e5x\n")
    assert load_config_file(tmp_path / "lr.yaml") == {"learning_rate": 1e-5, "beta": 2, "run_name": "1e5x"}


def test_empty_yaml_is_an_empty_mapping(tmp_path: Path) -> None:
    (tmp_path / "empty.yaml").write_text("")
    assert load_config_file(tmp_path / "empty.yaml") == {}


@pytest.mark.parametrize(("name", "text", "expected"), [
    ("x.ini", "", "must end in .toml, .yaml, .yml or .json"),
    ("bad.json", "{beta: 0.1", "is not valid JSON"),
    ("bad.toml", "beta = = 1", "is not valid TOML"),
    ("bad.yaml", "beta: [0.1", "is not valid YAML"),
    ("list.yaml", "- 1\n- 2\n", "must hold a mapping"),
])
def test_load_config_file_errors_name_the_file(tmp_path: Path, name: str, text: str, expected: str) -> None:
    (tmp_path / name).write_text(text)
    with pytest.raises(ValueError) as info:
        load_config_file(tmp_path / name)
    assert expected in str(info.value) and name in str(info.value)


def test_load_config_file_missing(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        load_config_file(tmp_path / "nope.yaml")
