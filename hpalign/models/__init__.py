"""Model loading, LoRA, reference and value head, split by concern; the public API is `hpalign.model`."""
