"""Writing: streamed safetensors shards and atomically published output directories."""
