"""One rank of the 2-rank partitioned-loading check (launched by test_partitioned_loading.py through
the deepspeed launcher): models loaded with a ZeRO-3 config are partitioned as they are created, the
gathered weights are the checkpoint's, LoRA wraps them and trains, and <out>/rank<k>.json says so."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from hpalign import distributed
from hpalign.models import apply_lora, load_policy, load_reference
from hpalign.tiny_model import build_tiny_llama
from hpalign.train import engine as engine_lib


def partition_report(model: torch.nn.Module) -> dict:
    """How the parameters look locally: every one a ZeRO-3 parameter with nothing materialised."""
    params = list(model.parameters())  # distinct parameters: a tied weight counts once
    return {"num_params": len(params),
            "all_partitioned": all(hasattr(p, "ds_id") and p.numel() == 0 for p in params),
            "full_numel": sum(int(p.ds_numel) for p in params if hasattr(p, "ds_numel")),
            "local_numel": sum(int(p.ds_tensor.numel()) for p in params if hasattr(p, "ds_tensor"))}


def gathered_max_diff(model: torch.nn.Module, expected: dict[str, torch.Tensor]) -> float:
    """Largest |gathered weight - expected| over the parameters named in `expected`."""
    import deepspeed

    worst = 0.0
    for name, param in model.named_parameters():
        with deepspeed.zero.GatheredParameters([param]):
            worst = max(worst, (param.detach() - expected[name]).abs().max().item())
    return worst


def lora_loss_gap(model_dir: Path, ds_config: dict, tokens: torch.Tensor) -> dict:
    """LoRA over a partitioned model (the adapter's B is 0 at first, so its loss is the base model's)
    against the same model loaded whole, and whether one training step runs."""
    torch.manual_seed(0)
    whole = apply_lora(load_policy(str(model_dir), dtype=torch.float32), targets=["ALL"], rank=4, alpha=8,
                       dropout=0.0)
    torch.manual_seed(0)
    partitioned = apply_lora(load_policy(str(model_dir), dtype=torch.float32, zero3_config=ds_config),
                             targets=["ALL"], rank=4, alpha=8, dropout=0.0)
    adapter_plain = all(not hasattr(p, "ds_id") for n, p in partitioned.named_parameters() if "lora_" in n)
    base_partitioned = all(hasattr(p, "ds_id") for n, p in partitioned.named_parameters() if "lora_" not in n)
    engine, _ = engine_lib.build_engine(partitioned, ds_config=ds_config, learning_rate=1e-2, weight_decay=0.0,
                                        betas=(0.9, 0.999), num_training_steps=2, warmup_ratio=0.0)
    with torch.no_grad():
        expected = whole(input_ids=tokens, labels=tokens).loss.item()
    loss = engine(input_ids=tokens, labels=tokens).loss
    engine.backward(loss)
    engine.step()
    with torch.no_grad():
        after = engine(input_ids=tokens, labels=tokens).loss.item()
    return {"adapter_plain": adapter_plain, "base_partitioned": base_partitioned,
            "loss_gap": abs(loss.item() - expected), "loss_before": loss.item(), "loss_after": after}


def main(out_dir: Path) -> None:
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    layout = distributed.init_distributed()
    model_dir = out_dir / "model"  # written by the test: tiny-random-llama with tied embeddings
    saved = load_file(model_dir / "model.safetensors")
    ds_config = engine_lib.deepspeed_config("zero3", micro_batch_size=1, gradient_accumulation_steps=1,
                                            max_grad_norm=1.0, dtype=torch.float32)
    policy = load_policy(str(model_dir), dtype=torch.float32, zero3_config=ds_config)
    result = {"rank": layout.rank, "world": layout.world_size, "policy": partition_report(policy),
              "zero3_flag_left_on": is_deepspeed_zero3_enabled(),
              "tied": policy.get_output_embeddings().weight is policy.get_input_embeddings().weight,
              "saved_numel": sum(t.numel() for name, t in saved.items() if name != "lm_head.weight"),
              "policy_max_diff": gathered_max_diff(policy, {**saved, "lm_head.weight": saved["model.embed_tokens.weight"]})}
    reference = load_reference(str(model_dir), dtype=torch.float32, zero3_config=ds_config)
    result["reference"] = {**partition_report(reference),
                           "frozen": not any(p.requires_grad for p in reference.parameters())}
    tiny = load_policy("tiny-random-llama", dtype=torch.float32, zero3_config=ds_config)
    result["tiny"] = partition_report(tiny)
    result["tiny_max_diff"] = gathered_max_diff(tiny, dict(build_tiny_llama(seed=0)[0].named_parameters()))
    tokens = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(layout.rank))
    result["lora"] = lora_loss_gap(model_dir, ds_config, tokens)
    (out_dir / f"rank{layout.rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(Path(sys.argv[-1]))  # the launcher puts --local_rank=<k> first
