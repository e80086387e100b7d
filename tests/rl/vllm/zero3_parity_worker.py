"""One rank of the 2-rank ZeRO-3 parity check (launched by test_zero3.py through the deepspeed
launcher): a LoRA tiny-random-llama partitioned by ZeRO-3 takes one training update, the rank's vLLM
engine gets the weights bucket by bucket (each bucket gathered across ranks), and greedy
continuations of vLLM and of HF generate on the gathered policy are written to <out>/rank<k>.json."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from hpalign import distributed
from hpalign.models import apply_lora
from hpalign.rl.rollout import HFGenerateRollouts, SamplingParams
from hpalign.rl.vllm_engine import VLLMRollouts, VLLMSettings
from hpalign.tiny_model import build_tiny_llama
from hpalign.train import engine as engine_lib

PROMPTS = [[5, 6, 7, 8], [40, 41], [100, 101, 102]]


def main(out_dir: Path) -> None:
    layout = distributed.init_distributed()
    model = apply_lora(build_tiny_llama(seed=0)[0], targets=["ALL"], rank=4, alpha=16, dropout=0.0)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.2, generator=torch.Generator().manual_seed(len(name)))
    ds_config = engine_lib.deepspeed_config("zero3", micro_batch_size=2, gradient_accumulation_steps=1,
                                            max_grad_norm=1.0, dtype=torch.float32)
    engine, _ = engine_lib.build_engine(model, ds_config=ds_config, learning_rate=5e-2, weight_decay=0.0,
                                           betas=(0.9, 0.999), num_training_steps=10, warmup_ratio=0.0)
    tokens = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(layout.rank))
    engine.backward(engine(input_ids=tokens, labels=tokens).loss)
    engine.step()
    engine.eval()
    rollouts = VLLMRollouts(engine, VLLMSettings(max_model_len=128, max_num_seqs=4, bucket_bytes=256 << 10),
                            layout.device, world_size=layout.data_parallel_size)
    report = rollouts.sync_weights()
    greedy = SamplingParams(max_new_tokens=16, temperature=0.0)
    from_vllm = rollouts.generate(PROMPTS, greedy, [0, 1, 2]).response_ids
    from_hf = HFGenerateRollouts(engine, pad_id=0, batch_size=1).generate(PROMPTS, greedy, [0, 1, 2]).response_ids
    result = {"vllm": from_vllm, "hf": from_hf, "sync": report, "world": layout.data_parallel_size}
    (out_dir / f"rank{layout.rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    main(Path(sys.argv[-1]))  # the launcher puts --local_rank=<k> first
