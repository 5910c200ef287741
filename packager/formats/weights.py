"""Where a model's weight bytes are, as the runtime sees them: what every format's size function returns."""

from __future__ import annotations

from dataclasses import dataclass

Tensor = tuple[str, tuple[int, ...]]  # GGUF name, numpy-order shape (rows, columns)


@dataclass(frozen=True)
class WeightLayout:
    """Where a model's weight bytes are, as the runtime sees them."""

    format: str
    per_layer: tuple[int, ...]  # bytes of each repeating layer (blk.N)
    embedding: int  # token embedding (stays on the CPU in llama.cpp)
    output: int  # output norm + output matrix (llama.cpp's "output layer"); 0 extra when tied
    other: int  # anything else (rope factors, caches)
    per_token: int  # bytes read to decode one token (every layer, the output matrix, norms)
    largest: int  # the largest single tensor / buffer
    repacked_per_layer: tuple[int, ...] = ()  # bytes copied into CPU repack buffers, per layer
    tensor_types: dict[str, int] | None = None  # ggml type name -> tensor count (GGUF)
    file_bytes: int = 0  # bytes of the model file(s) as written (alignment included), when known
    wasm_f32_bytes: int = 0  # the web page's WASM graph: int4 weights unpacked to f32 at load (ONNX)
    lazy: int = 0  # bytes of ``total`` the runtime reads from the file row by row instead of loading (GGUF)

    @property
    def total(self) -> int:
        return sum(self.per_layer) + self.embedding + self.output + self.other

    @property
    def loaded(self) -> int:
        """The weights held in memory once loaded: ``total`` less what is read lazily."""
        return self.total - self.lazy

    @property
    def repacked(self) -> int:
        return sum(self.repacked_per_layer)
