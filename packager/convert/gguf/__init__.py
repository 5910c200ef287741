"""GGUF: the streaming converter, its vocabulary, importance matrices, re-quantization and the tokenizer gate."""
