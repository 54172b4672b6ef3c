"""Loading: safetensors checkpoints, GGUF files, tokenizers, packaged models."""
