"""Load policy / reference / reward / value models, LoRA, value head, dropout: the public model API.

One module per concern below this package; import from the package itself. Nothing here
imports deepspeed, and peft / transformers are imported only when a function needs them.
"""

from hpalign.models.access import (
    base_causal_lm,
    decoder_and_head,
    decoder_of,
    frozen_copy,
    hidden_size,
    is_peft_model,
    unwrap_model,
)
from hpalign.models.dropout import disable_dropout
from hpalign.models.loading import (
    ensure_pad_token,
    load_policy,
    load_reference,
    load_tokenizer,
    partitioned_loading,
    resolve_attn_impl,
    resolve_dtype,
)
from hpalign.models.lora import (
    apply_lora,
    linear_module_names,
    lora_target_names,
    reference_forward_context,
    uses_adapter_reference,
)
from hpalign.models.reward_model import (
    RewardModel,
    is_reward_model,
    load_reward_model,
    split_reward_state_dict,
)
from hpalign.models.saving import save_pretrained_weights
from hpalign.models.source import (
    SMOLLM2_NAME,
    TINY_NAME,
    ModelSource,
    cache_root,
    directory_source,
    ensure_smollm2_cached,
    resolve_model,
    smollm2_gguf_path,
)
from hpalign.models.value_head import ValueHead, load_value_head, save_value_head

__all__ = [
    "SMOLLM2_NAME", "TINY_NAME", "ModelSource", "RewardModel", "ValueHead", "is_reward_model",
    "load_reward_model", "split_reward_state_dict", "apply_lora", "base_causal_lm",
    "cache_root", "decoder_and_head", "directory_source", "decoder_of", "disable_dropout", "ensure_pad_token", "ensure_smollm2_cached", "frozen_copy",
    "hidden_size", "is_peft_model", "linear_module_names", "load_policy", "load_reference",
    "load_tokenizer", "load_value_head", "lora_target_names", "partitioned_loading", "reference_forward_context",
    "resolve_attn_impl", "resolve_dtype", "resolve_model", "save_pretrained_weights",
    "save_value_head", "smollm2_gguf_path", "unwrap_model", "uses_adapter_reference",
]
