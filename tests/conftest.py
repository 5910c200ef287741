"""Shared fixtures: real small models, built once per machine (see tests/models.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import models  # noqa: E402


@pytest.fixture(scope="session")
def tiny_qwen2() -> Path:
    return models.tiny_qwen2()


@pytest.fixture(scope="session")
def tiny_llama() -> Path:
    return models.tiny_llama()


@pytest.fixture(scope="session")
def smollm2_hf() -> Path:
    return models.smollm2_hf()


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    return models.smollm2_gguf()
