"""The command line: seed `swift rlhf` commands, config files, errors, launchers."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from hpalign import cli
from hpalign.cli_args import build_parser, field_specs, parse_config, parse_flags, strip_local_rank
from hpalign.config import FLAG_ALIASES, Config, config_to_dict, resolve_defaults

REPO = Path(__file__).resolve().parents[1]

# Flags common to every example of the seed document (000_*.txt), in its order.
COMMON_TAIL = [
    "--num_train_epochs", "2", "--lora_target_modules", "ALL", "--gradient_checkpointing", "true",
    "--batch_size", "1", "--learning_rate", "5e-5", "--gradient_accumulation_steps", "16",
    "--warmup_ratio", "0.03", "--save_total_limit", "2"]
MODEL = ["--model_type", "llama3-8b-instruct"]

SEED_COMMANDS: dict[str, list[str]] = {
    "dpo": ["--rlhf_type", "dpo", *MODEL, "--beta", "0.1", "--rpo_alpha", "0.1", "--sft_type", "lora",
            "--dataset", "shareai-llama3-dpo-zh-en-emoji", *COMMON_TAIL],
    "rm": ["--rlhf_type", "rm", *MODEL, "--sft_type", "lora", "--dataset", "hh-rlhf-cn-harmless-base-cn",
           *COMMON_TAIL],
    "ppo": ["--rlhf_type", "ppo", *MODEL, "--sft_type", "lora", "--dataset", "hh-rlhf-cn-harmless-base-cn",
            "--reward_model_id_or_path", "path/to/reawrd_model", "--reward_model_type", "llama3-8b-instruct",
            *COMMON_TAIL],
    "kto": ["--rlhf_type", "kto", *MODEL, "--beta", "0.1", "--desirable_weight", "1.0", "--undesirable_weight", "1.0",
            "--sft_type", "lora", "--dataset", "ultrafeedback-kto", *COMMON_TAIL],
    "cpo": ["--rlhf_type", "cpo", *MODEL, "--beta", "0.1", "--sft_type", "lora",
            "--dataset", "shareai-llama3-dpo-zh-en-emoji", *COMMON_TAIL],
    "orpo": ["--rlhf_type", "orpo", *MODEL, "--beta", "0.1", "--sft_type", "lora",
             "--dataset", "shareai-llama3-dpo-zh-en-emoji", *COMMON_TAIL],
    "simpo": ["--rlhf_type", "simpo", *MODEL, "--beta", "2.0", "--simpo_gamma", "1.0", "--cpo_alpha", "1.0",
              "--sft_type", "lora", "--dataset", "shareai-llama3-dpo-zh-en-emoji", *COMMON_TAIL],
}


def assert_common(cfg: Config, dataset: str) -> None:
    assert cfg.model.model_type == "llama3-8b-instruct"
    assert cfg.tuning.sft_type == "lora" and cfg.tuning.lora_target_modules == ["ALL"]
    assert cfg.data.dataset == [dataset]
    assert cfg.train.num_train_epochs == 2.0 and cfg.train.gradient_checkpointing is True
    assert cfg.train.batch_size == 1 and cfg.train.learning_rate == 5e-5
    assert cfg.train.gradient_accumulation_steps == 16 and cfg.train.warmup_ratio == 0.03
    assert cfg.train.save_total_limit == 2


# --- the seed document's command lines ----------------------------------------------------------

def test_seed_dpo() -> None:
    cfg = cli.build_config(SEED_COMMANDS["dpo"])
    assert_common(cfg, "shareai-llama3-dpo-zh-en-emoji")
    assert cfg.algorithm.rlhf_type == "dpo" and cfg.algorithm.beta == 0.1 and cfg.algorithm.rpo_alpha == 0.1


def test_seed_dpo_ddp_variant_with_shell_arithmetic() -> None:
    # `--gradient_accumulation_steps $(expr 16 / $nproc_per_node)` with nproc_per_node=2.
    argv = list(SEED_COMMANDS["dpo"])
    argv[argv.index("--gradient_accumulation_steps") + 1] = "8"
    cfg = parse_config(argv)
    assert cfg.train.gradient_accumulation_steps == 8 and cfg.train.warmup_ratio == 0.03


def test_seed_rm() -> None:
    cfg = cli.build_config(SEED_COMMANDS["rm"])
    assert_common(cfg, "hh-rlhf-cn-harmless-base-cn")
    assert cfg.algorithm.rlhf_type == "rm" and cfg.algorithm.beta is None


def test_seed_ppo() -> None:
    cfg = cli.build_config(SEED_COMMANDS["ppo"])
    assert_common(cfg, "hh-rlhf-cn-harmless-base-cn")
    assert cfg.algorithm.rlhf_type == "ppo"
    assert cfg.ppo.reward_model_id_or_path == "path/to/reawrd_model"
    assert cfg.ppo.reward_model_type == "llama3-8b-instruct"
    assert cfg.ppo.kl_coef == 0.05 and cfg.ppo.lam == 0.95 and cfg.ppo.local_rollout_forward_batch_size == 64


def test_seed_kto() -> None:
    cfg = cli.build_config(SEED_COMMANDS["kto"])
    assert_common(cfg, "ultrafeedback-kto")
    a = cfg.algorithm
    assert (a.rlhf_type, a.beta, a.desirable_weight, a.undesirable_weight) == ("kto", 0.1, 1.0, 1.0)


@pytest.mark.parametrize("name", ["cpo", "orpo"])
def test_seed_cpo_orpo(name: str) -> None:
    cfg = cli.build_config(SEED_COMMANDS[name])
    assert_common(cfg, "shareai-llama3-dpo-zh-en-emoji")
    assert cfg.algorithm.rlhf_type == name and cfg.algorithm.beta == 0.1


def test_seed_simpo() -> None:
    cfg = cli.build_config(SEED_COMMANDS["simpo"])
    assert_common(cfg, "shareai-llama3-dpo-zh-en-emoji")
    a = cfg.algorithm
    assert (a.rlhf_type, a.beta, a.simpo_gamma, a.cpo_alpha) == ("simpo", 2.0, 1.0, 1.0)


@pytest.mark.parametrize("name", list(SEED_COMMANDS))
def test_every_seed_command_runs_through_main(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    received = install_fake_train(monkeypatch)
    monkeypatch.delenv("NPROC_PER_NODE", raising=False)
    assert cli.main(["rlhf", *SEED_COMMANDS[name]]) == 0
    assert received[0].algorithm.rlhf_type == name


# --- flag syntax --------------------------------------------------------------------------------

def test_only_given_flags_are_returned() -> None:
    values, config_path = parse_flags(["--beta", "0.2", "--dataset", "a.jsonl", "b.parquet"])
    assert values == {"beta": 0.2, "dataset": ["a.jsonl", "b.parquet"]} and config_path is None


@pytest.mark.parametrize(("tokens", "expected"), [
    (["--packing", "false"], False), (["--packing", "0"], False), (["--packing", "no"], False),
    (["--packing", "True"], True), (["--packing", "YES"], True), (["--packing", "1"], True),
    (["--packing"], True), (["--packing=off"], False)])
def test_booleans(tokens: list[str], expected: bool) -> None:
    assert parse_config([*tokens, "--beta", "0.3"]).data.packing is expected


def test_bare_boolean_before_another_flag() -> None:
    cfg = parse_config(["--whiten_rewards", "--batch_size", "3"])
    assert cfg.ppo.whiten_rewards is True and cfg.train.batch_size == 3


def test_bad_boolean_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        parse_config(["--packing", "maybe"])
    assert info.value.code == 2
    assert "expected true or false" in capsys.readouterr().err


@pytest.mark.parametrize("word", ["none", "null", "None"])
def test_optional_flags_accept_none(word: str) -> None:
    cfg = parse_config(["--save_total_limit", word, "--beta", word, "--run_name", word])
    assert cfg.train.save_total_limit is None and cfg.algorithm.beta is None and cfg.train.run_name is None


def test_typed_values_and_equals_form() -> None:
    cfg = parse_config(["--max_length=512", "--beta=-0.0", "--lora_rank", "16", "--report_to", "wandb", "tensorboard"])
    assert cfg.data.max_length == 512 and cfg.tuning.lora_rank == 16
    assert cfg.train.report_to == ["wandb", "tensorboard"]


def test_non_numeric_value_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        parse_config(["--batch_size", "two"])
    assert info.value.code == 2 and "expected int, got 'two'" in capsys.readouterr().err


@pytest.mark.parametrize(("alias", "value"), list(FLAG_ALIASES.items()))
def test_every_alias_sets_its_field(alias: str, value: str) -> None:
    spec = field_specs()[value]
    raw = {"str": "x", "int": "7", "float": "0.5", "bool": "true"}[spec.base.__name__]
    cfg = parse_config([f"--{alias}", raw])
    got = getattr(getattr(cfg, spec.section), value)
    assert got == spec.base(raw) if spec.base is not bool else got is True


def test_model_id_or_path_alias() -> None:
    assert parse_config(["--model_id_or_path", "/models/llama"]).model.model == "/models/llama"


def test_abbreviations_are_not_accepted(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_config(["--rpo_alp", "0.1"])
    assert "did you mean --rpo_alpha?" in capsys.readouterr().err


def test_unknown_flag_suggests_closest(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        parse_config(["--rlhf_type", "dpo", "--rpo_alfa", "0.1"])
    assert info.value.code == 2
    assert "unknown flag --rpo_alfa; did you mean --rpo_alpha?" in capsys.readouterr().err


def test_unknown_flag_without_close_match(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_config(["--zzzzqqq", "1"])
    assert "unknown flag --zzzzqqq; see --help" in capsys.readouterr().err


def test_stray_value_is_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        parse_config(["--beta", "0.1", "0.2"])
    assert info.value.code == 2 and "unexpected value(s): 0.2" in capsys.readouterr().err


def test_help_lists_every_field_with_defaults_and_the_ddp_epilog() -> None:
    text = build_parser().format_help()
    for name in field_specs():
        assert f"--{name}" in text
    assert "--model_id_or_path" in text and "sigmoid (default)" in text and "[default: 0.05]" in text
    assert "NPROC_PER_NODE" in text and "MASTER_PORT" in text


# --- config files -------------------------------------------------------------------------------

FILES = {
    "flat.toml": 'rlhf_type = "kto"\nbeta = 0.3\nbatch_size = 2\ndataset = ["a.jsonl", "b.jsonl"]\n',
    "nested.toml": '[algorithm]\nrlhf_type = "kto"\nbeta = 0.3\n[train]\nbatch_size = 2\n'
                   '[data]\ndataset = ["a.jsonl", "b.jsonl"]\n',
    "flat.yaml": "rlhf_type: kto\nbeta: 0.3\nbatch_size: 2\ndataset: [a.jsonl, b.jsonl]\n",
    "nested.yml": "algorithm:\n  rlhf_type: kto\n  beta: 0.3\ntrain:\n  batch_size: 2\n"
                  "data:\n  dataset: [a.jsonl, b.jsonl]\n",
    "flat.json": '{"rlhf_type": "kto", "beta": 0.3, "batch_size": 2, "dataset": ["a.jsonl", "b.jsonl"]}',
    "nested.json": '{"algorithm": {"rlhf_type": "kto", "beta": 0.3}, "train": {"batch_size": 2}, '
                   '"data": {"dataset": ["a.jsonl", "b.jsonl"]}}',
}


@pytest.mark.parametrize("name", list(FILES))
def test_config_file_then_flags_override(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_text(FILES[name])
    from_file = parse_config(["--config", str(path)])
    assert from_file.algorithm.rlhf_type == "kto" and from_file.algorithm.beta == 0.3
    assert from_file.train.batch_size == 2 and from_file.data.dataset == ["a.jsonl", "b.jsonl"]
    overridden = parse_config(["--beta", "0.5", "--config", str(path), "--dataset", "c.jsonl"])
    assert overridden.algorithm.beta == 0.5 and overridden.data.dataset == ["c.jsonl"]
    # flags not given keep the file's values, not the schema defaults
    assert overridden.algorithm.rlhf_type == "kto" and overridden.train.batch_size == 2


def test_file_model_key_is_field_or_section(tmp_path: Path) -> None:
    flat = tmp_path / "flat.yaml"
    flat.write_text("model: /m\n")
    nested = tmp_path / "nested.yaml"
    nested.write_text("model:\n  model: /m\n  template: chatml\n")
    assert parse_config(["--config", str(flat)]).model.model == "/m"
    cfg = parse_config(["--config", str(nested)])
    assert cfg.model.model == "/m" and cfg.model.template == "chatml"


def test_file_accepts_aliases_ints_for_floats_and_null(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("lr: 1e-5\nbeta: 2\nsave_total_limit: null\nlora_target_modules: ALL\n")
    cfg = parse_config(["--config", str(path)])
    assert cfg.train.learning_rate == 1e-5 and cfg.algorithm.beta == 2.0 and isinstance(cfg.algorithm.beta, float)
    assert cfg.train.save_total_limit is None and cfg.tuning.lora_target_modules == ["ALL"]


@pytest.mark.parametrize(("text", "expected"), [
    ("rpo_alfa: 0.1\n", "unknown key 'rpo_alfa'; did you mean 'rpo_alpha'?"),
    ("algorithm:\n  batch_size: 2\n", "unknown key 'batch_size'"),
    ("algoritm:\n  beta: 0.1\n", "did you mean 'algorithm'?"),
    ("beta: high\n", "key 'beta' must be a float or null, got 'high'"),
    ("batch_size: 1.5\n", "key 'batch_size' must be an int, got 1.5"),
    ("packing: 'yes'\n", "key 'packing' must be a bool"),
    ("max_length: true\n", "key 'max_length' must be an int"),
    ("dataset: [1, 2]\n", "key 'dataset' must be a list of str"),
    ("rlhf_type: null\n", "key 'rlhf_type' must be a str"),
    ("lr: 0.1\nlearning_rate: 0.2\n", "'learning_rate' is set twice"),
])
def test_bad_file_keys_and_values_name_key_and_file(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValueError) as info:
        parse_config(["--config", str(path)])
    assert expected in str(info.value) and str(path) in str(info.value)


def test_quoted_number_in_json_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text('{"learning_rate": "5e-5"}')
    with pytest.raises(ValueError, match="key 'learning_rate' must be a float"):
        parse_config(["--config", str(path)])


# --- local rank, relaunch, subcommands ----------------------------------------------------------

@pytest.mark.parametrize(("argv", "flags", "rank"), [
    (["--beta", "0.1", "--local_rank=3"], ["--beta", "0.1"], 3),
    (["--local_rank", "0", "--beta", "0.1"], ["--beta", "0.1"], 0),
    (["--local-rank=1", "--dataset", "a", "b"], ["--dataset", "a", "b"], 1),
    (["--beta", "0.1"], ["--beta", "0.1"], None),
])
def test_strip_local_rank(argv: list[str], flags: list[str], rank: int | None) -> None:
    assert strip_local_rank(argv) == (flags, rank)


@pytest.mark.parametrize("argv", [["--local_rank"], ["--local_rank=x"]])
def test_strip_local_rank_bad_value(argv: list[str]) -> None:
    with pytest.raises(ValueError, match="local_rank"):
        strip_local_rank(argv)


def test_ddp_relaunch_command_from_document_env() -> None:
    argv = ["--rlhf_type", "dpo", "--beta", "0.1"]
    command = cli.ddp_relaunch_command(argv, {"NPROC_PER_NODE": "2", "MASTER_PORT": "29600"})
    entry = str(REPO / "launch" / "train.py")
    assert command == ["deepspeed", "--num_gpus", "2", "--master_port", "29600", entry, *argv]
    default_port = cli.ddp_relaunch_command(argv, {"NPROC_PER_NODE": "4"})
    assert default_port is not None and default_port[default_port.index("--master_port") + 1] == "29500"


def test_ddp_relaunch_honours_cuda_visible_devices() -> None:
    env = {"NPROC_PER_NODE": "2", "CUDA_VISIBLE_DEVICES": "0,1,2,3"}
    command = cli.ddp_relaunch_command(["--beta", "0.1"], env)
    assert command is not None and command[1:3] == ["--include", "localhost:0,1"]
    with pytest.raises(ValueError, match="lists only 1 device"):
        cli.ddp_relaunch_command([], {"NPROC_PER_NODE": "2", "CUDA_VISIBLE_DEVICES": "5"})


@pytest.mark.parametrize("env", [{}, {"NPROC_PER_NODE": "1"}, {"NPROC_PER_NODE": "2", "LOCAL_RANK": "0"},
                                 {"NPROC_PER_NODE": "2", "RANK": "1"}])
def test_no_relaunch(env: dict[str, str]) -> None:
    assert cli.ddp_relaunch_command(["--beta", "0.1"], env) is None


def test_ddp_relaunch_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="positive integer"):
        cli.ddp_relaunch_command([], {"NPROC_PER_NODE": "two"})
    with pytest.raises(ValueError, match="pip install -e"):
        cli.ddp_relaunch_command([], {"NPROC_PER_NODE": "2"}, entry=tmp_path / "launch" / "train.py")


def install_fake_train(monkeypatch: pytest.MonkeyPatch, code: int | None = None) -> list[Config]:
    """Replace hpalign.train with a module whose run() records its Config (no torch import)."""
    received: list[Config] = []

    def run(cfg: Config) -> int | None:
        received.append(cfg)
        return code

    monkeypatch.setitem(sys.modules, "hpalign.train", types.SimpleNamespace(run=run))
    return received


def test_rlhf_runs_training_with_resolved_config(monkeypatch: pytest.MonkeyPatch) -> None:
    received = install_fake_train(monkeypatch)
    monkeypatch.delenv("NPROC_PER_NODE", raising=False)
    assert cli.main(["rlhf", "--rlhf_type", "simpo", "--sft_type", "full"]) == 0
    (cfg,) = received
    assert cfg.algorithm.beta == 2.0 and cfg.train.learning_rate == 1e-5 and cfg.data.max_tokens_per_batch is None


def test_training_exit_code_is_returned(monkeypatch: pytest.MonkeyPatch) -> None:
    install_fake_train(monkeypatch, code=3)
    monkeypatch.delenv("NPROC_PER_NODE", raising=False)
    assert cli.main(["rlhf"]) == 3


def test_rlhf_relaunches_under_nproc(monkeypatch: pytest.MonkeyPatch) -> None:
    received = install_fake_train(monkeypatch)
    launched: list[list[str]] = []
    monkeypatch.setattr(cli, "_relaunch", lambda command: launched.append(command) or 0)
    monkeypatch.setenv("NPROC_PER_NODE", "2")
    for name in ("LOCAL_RANK", "RANK", "CUDA_VISIBLE_DEVICES", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert cli.main(["sft", "--beta", "0.1"]) == 0
    assert not received
    assert launched[0][:5] == ["deepspeed", "--num_gpus", "2", "--master_port", "29500"]
    assert launched[0][6:] == ["--rlhf_type", "sft", "--beta", "0.1"]


def test_sft_forces_rlhf_type(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    received = install_fake_train(monkeypatch)
    monkeypatch.delenv("NPROC_PER_NODE", raising=False)
    assert cli.main(["sft", "--dataset", "a.jsonl"]) == 0
    assert received[0].algorithm.rlhf_type == "sft"
    assert cli.main(["sft", "--rlhf_type", "dpo"]) == 2
    assert "`hpalign sft` runs with --rlhf_type sft" in capsys.readouterr().err


def test_invalid_config_returns_2_without_training(monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    received = install_fake_train(monkeypatch)
    assert cli.main(["rlhf", "--rlhf_type", "dpoo"]) == 2
    assert not received and "use one of: dpo, kto" in capsys.readouterr().err


def test_unknown_flag_through_main_returns_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["rlhf", "--rpo_alfa", "0.1"]) == 2
    assert "did you mean --rpo_alpha?" in capsys.readouterr().err


def test_main_usage_and_unknown_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == 2
    assert cli.main(["--help"]) == 0 and "rlhf" in capsys.readouterr().out
    assert cli.main(["rlfh"]) == 2 and "did you mean `hpalign rlhf`?" in capsys.readouterr().err
    assert cli.main(["rlhf", "--help"]) == 0 and "--rpo_alpha" in capsys.readouterr().out


def test_config_show_prints_resolved_yaml(capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    assert cli.main(["config", "--show", "--rlhf_type", "kto", "--lr", "3e-5"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    expected = resolve_defaults(parse_config(["--rlhf_type", "kto", "--learning_rate", "3e-5"]))
    assert shown == config_to_dict(expected) and shown["algorithm"]["beta"] == 0.1


def test_launch_main_strips_local_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    received = install_fake_train(monkeypatch)
    fake_env: dict[str, str] = {}
    monkeypatch.setattr(os, "environ", fake_env)  # launch_main exports LOCAL_RANK; keep it out of the real env
    assert cli.launch_main(["--rlhf_type", "orpo", "--local_rank=1", "--batch_size", "2"]) == 0
    assert received[0].algorithm.rlhf_type == "orpo" and received[0].train.batch_size == 2
    assert fake_env == {"LOCAL_RANK": "1"}


def test_launch_script_and_module_entry_run_from_a_checkout(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    script = subprocess.run([sys.executable, str(REPO / "launch" / "train.py"), "--help", "--local_rank=0"],
                            capture_output=True, text=True, cwd=tmp_path, env=env, timeout=60)
    assert script.returncode == 0, script.stderr
    assert "--rpo_alpha" in script.stdout
    bad = subprocess.run([sys.executable, str(REPO / "launch" / "train.py"), "--rpo_alfa", "1"],
                         capture_output=True, text=True, cwd=tmp_path, env=env, timeout=60)
    assert bad.returncode == 2 and "did you mean --rpo_alpha?" in bad.stderr
    module = subprocess.run([sys.executable, "-m", "hpalign", "config", "--show", "--rlhf_type", "simpo"],
                            capture_output=True, text=True, cwd=REPO, timeout=60)
    assert module.returncode == 0, module.stderr
    assert "beta: 2.0" in module.stdout


# --- hpalign score (the scoring itself: tests/test_score.py) --------------------------------------

def test_score_command_is_listed_and_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert "score" in cli.COMMANDS and "score    --checkpoint DIR" in cli.USAGE
    assert cli.main(["score", "--help"]) == 0
    assert "--checkpoint" in capsys.readouterr().out


def test_score_command_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["score", "--dataset", "x.jsonl"]) == 2  # --checkpoint is required
    assert "--checkpoint" in capsys.readouterr().err
    assert cli.main(["score", "--checkpoint", str(tmp_path / "nope"), "--dataset", "x.jsonl"]) == 2
    assert "hpalign score: error: checkpoint directory" in capsys.readouterr().err
    assert cli.main(["score", "--checkpoint", str(tmp_path), "--dataset", "x.jsonl"]) == 2
    assert "train with --rlhf_type rm" in capsys.readouterr().err
