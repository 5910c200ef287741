"""llama.cpp's own tools (llama-bench, llama-perplexity, llama-gguf-split), built from the source
vendored in the installed llama-cpp-python's sdist: the reference our benchmarks
compare against.

    python benchmarks/llama_tools.py            # build (cached) and print the paths

The build is cached under ~/.cache/edgepack-tests/llama-tools-<version>/ (about
6 minutes on 2 cores the first time). Native CPU flags, no GPU backends: the
same ggml the pip build of llama-cpp-python produces on this host.
"""
from __future__ import annotations

import fcntl
import importlib.metadata
import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.models import CACHE, llama_cpp_src  # noqa: E402

TOOLS = ("llama-bench", "llama-perplexity", "llama-gguf-split")


def tools_dir() -> Path:
    return CACHE / f"llama-tools-{importlib.metadata.version('llama-cpp-python')}"


def llama_tool(name: str) -> Path:
    """Path of a built llama.cpp tool; builds all of TOOLS on first use."""
    final = tools_dir()
    if not (final / name).exists():
        final.parent.mkdir(parents=True, exist_ok=True)
        # Tests and benchmarks may ask at once (pytest beside a benchmark): one builds, the others wait.
        with open(final.with_name(final.name + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (final / name).exists():
                _build(final)
    return final / name


def _build(final: Path) -> None:
    src = llama_cpp_src()
    build = final.with_name(final.name + ".build")
    shutil.rmtree(build, ignore_errors=True)
    jobs = str(os.cpu_count() or 2)
    subprocess.run(
        ["cmake", "-S", str(src), "-B", str(build), "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release",
         "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
         "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DBUILD_SHARED_LIBS=OFF"],
        check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", str(build), "-j", jobs, "--target", *TOOLS], check=True)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in TOOLS:
        shutil.copy2(build / "bin" / name, tmp / name)
    os.replace(tmp, final)
    shutil.rmtree(build, ignore_errors=True)


if __name__ == "__main__":
    for tool in TOOLS:
        print(llama_tool(tool))
