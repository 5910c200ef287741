"""ONNX int4: the streaming graph writer for onnxruntime-genai, and the optimum-onnx fallback."""
