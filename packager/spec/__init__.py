"""Stage 2, spec: what a model is (ModelSpec), from config.json or GGUF metadata alone; its tensor list and chat template."""
