"""Stage 1, source: a hub id, a local directory or a GGUF file, made local files with a pinned revision; safetensors and pickle reads, remote-code refusal, hashing."""
