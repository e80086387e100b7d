"""hpalign.export: an RM checkpoint exported as an HF sequence-classification model scores as hpalign does.

Checkpoints are written the trainer's way without training (`tests.test_score.save_reward_checkpoint`);
the exported directory is read back by `AutoModelForSequenceClassification` (right padding, HF's
last-non-pad-token rule) and by `load_seq_cls_reward_model` -> `reward_stats`, and both are compared
with `hpalign.score` on the same texts in one padded batch.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from hpalign import cli, export
from hpalign import models as hm
from hpalign.data import collate, templates
from hpalign.data.types import LoadReport, PreferenceExample, SFTExample, TokenizedExample
from hpalign.export import export_seq_cls
from hpalign.losses import reward_losses
from hpalign.models.reward_model import REWARD_OFFSET_KEY, load_seq_cls_reward_model
from hpalign.score import load_reward_model, score
from hpalign.tiny_model import build_tiny_llama
from hpalign.train.forward import reward_stats
from tests.test_score import save_reward_checkpoint

PROMPTS = [[{"role": "user", "content": "Hi"}],
           [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour, please."}],
           [{"role": "user", "content": "Tell me about the sea and the sky, in a long sentence or two."}]]
RESPONSES = ["Hello!", "Blue.", "The sea is wide and grey; the sky above it is wider still and always moving."]


def set_value_head_bias(directory: Path, bias: float) -> None:
    head = hm.load_value_head(directory, 256)
    with torch.no_grad():
        head.summary.bias.fill_(bias)
    hm.save_value_head(head, directory)


def rm_checkpoint(directory: Path, *, lora: bool, bias: float = 0.0) -> Path:
    """A tiny RM checkpoint (perturbed LoRA / full weights, a non-trivial head) with the given bias."""
    save_reward_checkpoint(directory, lora=lora)
    set_value_head_bias(directory, bias)
    return directory


def hpalign_rewards(checkpoint: Path) -> torch.Tensor:
    """[3] rewards of RESPONSES by `hpalign.score` (its own batching and padding)."""
    reward_model, tokenizer, template = load_reward_model(checkpoint)
    return score(reward_model, tokenizer, template, PROMPTS, RESPONSES, batch_size=2)


def token_ids(tokenizer) -> list[list[int]]:
    """prompt + response ids of each text, exactly what `hpalign.score` scores."""
    template = templates.resolve_template(tokenizer, "tokenizer")
    examples = [SFTExample(p, r, f"item {i}") for i, (p, r) in enumerate(zip(PROMPTS, RESPONSES, strict=True))]
    tokenized = templates.tokenize_examples(examples, template, max_length=256, report=LoadReport())
    return [t.prompt_ids + t.responses[0] for t in tokenized]


def hf_scores(directory: Path) -> torch.Tensor:
    """[3] scores by transformers alone: one right-padded batch, HF's own last-token rule."""
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model, info = AutoModelForSequenceClassification.from_pretrained(directory, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched weights
    ids = token_ids(tokenizer)
    assert len({len(i) for i in ids}) == 3  # different lengths: padding matters
    batch = tokenizer.pad({"input_ids": ids}, padding=True, return_tensors="pt")
    assert tokenizer.padding_side == "right"
    with torch.no_grad():
        return model(**batch).logits[:, 0]


# --- exact export ---------------------------------------------------------------------------------


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_export_scores_identically(tmp_path, lora):
    checkpoint = rm_checkpoint(tmp_path / "ckpt", lora=lora)
    out = export_seq_cls(checkpoint, tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"]
    assert len(config["id2label"]) == 1 and config["pad_token_id"] == 259 and REWARD_OFFSET_KEY not in config
    assert not (out / "adapter_model.safetensors").exists()  # merged, not an adapter
    expected = hpalign_rewards(checkpoint)
    assert expected.std() > 1e-3
    torch.testing.assert_close(hf_scores(out), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_load_seq_cls_reward_model_round_trip(tmp_path, lora):
    checkpoint = rm_checkpoint(tmp_path / "ckpt", lora=lora)
    out = export_seq_cls(checkpoint, tmp_path / "out")
    reward_model = load_seq_cls_reward_model(out, dtype="float32")
    assert type(reward_model.lm).__name__ == "LlamaForSequenceClassification"
    assert not reward_model.training and not any(p.requires_grad for p in reward_model.parameters())
    assert reward_model.value_head.summary.bias.item() == 0.0
    tokenizer = AutoTokenizer.from_pretrained(out)
    examples = [TokenizedExample(ids[:-1], [ids[-1:]], f"item {i}")  # any prompt/response split
                for i, ids in enumerate(token_ids(tokenizer))]
    batch = collate.pad_batch(examples, pad_id=tokenizer.pad_token_id)
    with torch.no_grad():
        rewards = reward_stats(reward_model, batch, packed=False).rewards_ER[:, 0]
    torch.testing.assert_close(rewards, hpalign_rewards(checkpoint), atol=1e-5, rtol=1e-5)


def test_export_in_bfloat16(tmp_path):
    out = export_seq_cls(rm_checkpoint(tmp_path / "ckpt", lora=True), tmp_path / "out", dtype="bfloat16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    reward_model = load_seq_cls_reward_model(out, dtype="bfloat16")
    assert reward_model.value_head.summary.weight.dtype == torch.bfloat16


# --- the value-head bias --------------------------------------------------------------------------


def test_bradley_terry_gives_the_bias_no_gradient_and_centring_does():
    """Why a trained RM's bias is normally 0: d/db (r_w - r_l) = 0; the centring term (r_w + r_l)^2 is not."""
    lm, tokenizer = build_tiny_llama(seed=0)
    reward_model = hm.RewardModel.with_new_head(lm, seed=3)
    template = templates.resolve_template(tokenizer, "auto")
    pairs = [PreferenceExample(p, r, r[::-1], f"pair {i}") for i, (p, r) in enumerate(zip(PROMPTS, RESPONSES, strict=True))]
    batch = collate.pad_batch(templates.tokenize_examples(pairs, template, max_length=256, report=LoadReport()),
                              pad_id=tokenizer.pad_token_id)
    bias = reward_model.value_head.summary.bias
    for coefficient, zero_grad in [(0.0, True), (0.1, False)]:
        reward_model.zero_grad()
        rewards_ER = reward_stats(reward_model, batch, packed=False).rewards_ER
        losses_B, _ = reward_losses(rewards_ER[:, 0], rewards_ER[:, 1], center_rewards_coefficient=coefficient)
        losses_B.sum().backward()
        assert (bias.grad.abs().max().item() == 0.0) == zero_grad, (coefficient, bias.grad)
        assert reward_model.value_head.summary.weight.grad.abs().max() > 0


def test_non_zero_bias_is_an_error(tmp_path):
    checkpoint = rm_checkpoint(tmp_path / "ckpt", lora=True, bias=0.25)
    with pytest.raises(ValueError, match=r"bias 0.25.*center_rewards_coefficient.*--drop_bias"):
        export_seq_cls(checkpoint, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_drop_bias_records_the_offset_and_warns(tmp_path, caplog):
    checkpoint = rm_checkpoint(tmp_path / "ckpt", lora=True, bias=0.25)
    with caplog.at_level(logging.WARNING, logger="hpalign"):
        out = export_seq_cls(checkpoint, tmp_path / "out", drop_bias=True)
    assert "dropping the value-head bias 0.25" in caplog.text
    assert json.loads((out / "config.json").read_text())[REWARD_OFFSET_KEY] == 0.25
    expected = hpalign_rewards(checkpoint)
    torch.testing.assert_close(hf_scores(out), expected - 0.25, atol=1e-5, rtol=1e-5)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hpalign"):
        reward_model = load_seq_cls_reward_model(out, dtype="float32")
    assert "minus 0.25" in caplog.text and reward_model.value_head.summary.bias.item() == 0.0  # as HF scores


# --- the pad token --------------------------------------------------------------------------------


def pad_with_eos(checkpoint: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    tokenizer.pad_token = tokenizer.eos_token  # <|im_end|>, the token every response ends with
    tokenizer.save_pretrained(checkpoint)


def test_pad_token_that_ends_responses_is_an_error(tmp_path):
    checkpoint = rm_checkpoint(tmp_path / "ckpt", lora=True)
    pad_with_eos(checkpoint)
    suggestion = r"\['<pad>', '<\|endoftext\|>'\]"  # the special tokens that neither end nor start a text
    with pytest.raises(ValueError, match=rf"pad token '<\|im_end\|>'.*responses end with.*--pad_token.*{suggestion}"):
        export_seq_cls(checkpoint, tmp_path / "out")
    with pytest.raises(ValueError, match="pad token '<\\|im_end\\|>'"):
        export_seq_cls(checkpoint, tmp_path / "out", pad_token="<|im_end|>")
    with pytest.raises(ValueError, match="'nope' is not a token"):
        export_seq_cls(checkpoint, tmp_path / "out", pad_token="nope")


def test_eos_as_pad_would_score_the_wrong_token(tmp_path, monkeypatch):
    """Why the check exists: HF skips the trailing <|im_end|> as padding and scores the token before."""
    checkpoint = rm_checkpoint(tmp_path / "ckpt", lora=True)
    pad_with_eos(checkpoint)
    monkeypatch.setattr(export, "_response_end_ids", lambda tokenizer, template: set())
    out = export_seq_cls(checkpoint, tmp_path / "out")
    assert (hf_scores(out) - hpalign_rewards(checkpoint)).abs().max() > 0.1


def test_pad_token_flag_gives_an_exact_export(tmp_path):
    checkpoint = rm_checkpoint(tmp_path / "ckpt", lora=False)
    pad_with_eos(checkpoint)
    out = export_seq_cls(checkpoint, tmp_path / "out", pad_token="<|endoftext|>")
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.pad_token == "<|endoftext|>"
    assert json.loads((out / "config.json").read_text())["pad_token_id"] == tokenizer.pad_token_id == 256
    torch.testing.assert_close(hf_scores(out), hpalign_rewards(checkpoint), atol=1e-5, rtol=1e-5)


def test_chatml_training_template_is_exported(tmp_path):
    checkpoint = rm_checkpoint(tmp_path / "ckpt", lora=True)
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    (checkpoint / "trainer_state.json").write_text(json.dumps({**state, "template": "chatml"}))
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    tokenizer.chat_template = None  # a base model: hpalign trained it with its built-in chatml
    tokenizer.save_pretrained(checkpoint)
    (checkpoint / "chat_template.jinja").unlink(missing_ok=True)
    out = export_seq_cls(checkpoint, tmp_path / "out")
    exported = AutoTokenizer.from_pretrained(out)
    chatml = templates.resolve_template(exported, "chatml")
    for prompt in PROMPTS:
        assert exported.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True) == \
            chatml.render_prompt(prompt)


# --- errors ---------------------------------------------------------------------------------------


def test_export_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        export_seq_cls(tmp_path / "nope", tmp_path / "out")
    checkpoint = rm_checkpoint(tmp_path / "ckpt", lora=True)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(ValueError, match="not an empty directory"):
        export_seq_cls(checkpoint, tmp_path / "full")


def test_load_seq_cls_errors_name_the_path(tmp_path):
    with pytest.raises(ValueError, match=f"{tmp_path / 'nope'}.*does not exist"):
        load_seq_cls_reward_model(tmp_path / "nope", dtype="float32")
    checkpoint = rm_checkpoint(tmp_path / "ckpt", lora=True)
    with pytest.raises(ValueError, match=f"{checkpoint} has no config.json.*hpalign export"):
        load_seq_cls_reward_model(checkpoint, dtype="float32")
    lm, _ = build_tiny_llama(seed=0)
    lm.save_pretrained(tmp_path / "causal")
    with pytest.raises(ValueError, match=r"causal is not a sequence-classification.*LlamaForCausalLM"):
        load_seq_cls_reward_model(tmp_path / "causal", dtype="float32")
    lm.config.num_labels = 2
    AutoModelForSequenceClassification.from_config(lm.config).save_pretrained(tmp_path / "two")
    with pytest.raises(ValueError, match="two has num_labels=2.*exactly one label"):
        load_seq_cls_reward_model(tmp_path / "two", dtype="float32")


# --- the command ----------------------------------------------------------------------------------


def test_cli_export(tmp_path, capsys):
    checkpoint = rm_checkpoint(tmp_path / "ckpt", lora=True)
    out = tmp_path / "out"
    assert cli.main(["export", "--checkpoint", str(checkpoint), "--seq_cls", "--output", str(out)]) == 0
    assert f"-> {out}" in capsys.readouterr().out
    assert all((out / name).is_file() for name in ("config.json", "model.safetensors", "tokenizer_config.json"))
    torch.testing.assert_close(hf_scores(out), hpalign_rewards(checkpoint), atol=1e-5, rtol=1e-5)
    assert cli.main(["export", "--checkpoint", str(checkpoint), "--output", str(tmp_path / "o2")]) == 2
    assert "--seq_cls" in capsys.readouterr().err
    set_value_head_bias(checkpoint, 0.5)
    assert cli.main(["export", "--checkpoint", str(checkpoint), "--seq_cls", "--output", str(tmp_path / "o3")]) == 2
    assert "--drop_bias" in capsys.readouterr().err
    assert cli.main(["export", "--checkpoint", str(checkpoint), "--seq_cls", "--drop_bias",
                     "--output", str(tmp_path / "o3")]) == 0
