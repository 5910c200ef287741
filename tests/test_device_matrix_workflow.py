""".github/workflows/device-matrix.yml: valid against GitHub's workflow schema, and its jobs' commands
run here as the runners would run them (bash -eo pipefail), on the embedded SmolLM2 at small -p/-n/-r."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / ".github" / "workflows" / "device-matrix.yml"
RUNNERS = {"ubuntu-latest", "ubuntu-24.04-arm", "macos-14", "windows-latest"}
# What the local run swaps in for the workflow's env: one model, one target, tiny tests.
LOCAL_ENV = {"BENCH_ARGS": "-p 16 -n 4 -r 1 --threads 1", "MATRIX_MODELS": "smollm2-135m", "MATRIX_TARGETS": "laptop"}


@pytest.fixture(scope="module")
def wf() -> dict:
    return yaml.safe_load(WORKFLOW.read_text())


def test_workflow_matches_githubs_schema():
    proc = subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.github-workflows",
                           str(WORKFLOW)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_schema_check_catches_a_broken_workflow(tmp_path):
    # The check runs offline (check-jsonschema's vendored schema) and does fail on a typo'd key.
    broken = tmp_path / "device-matrix.yml"
    broken.write_text(WORKFLOW.read_text().replace("runs-on: ${{ matrix.runner }}", "runs_on: ${{ matrix.runner }}"))
    proc = subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.github-workflows",
                           str(broken)], capture_output=True, text=True)
    assert proc.returncode == 1 and "runs_on" in proc.stdout + proc.stderr


def test_workflow_shape(wf):
    jobs = wf["jobs"]
    assert set(jobs) == {"bench", "report"}
    bench, rep = jobs["bench"], jobs["report"]
    assert set(bench["strategy"]["matrix"]["runner"]) == RUNNERS and bench["strategy"]["fail-fast"] is False
    assert bench["runs-on"] == "${{ matrix.runner }}"
    assert rep["needs"] == "bench" and rep["if"] == "always()"
    uses = lambda job: [s.get("uses", "").split("@")[0] for s in job["steps"]]  # noqa: E731
    assert "actions/upload-artifact" in uses(bench) and "actions/download-artifact" in uses(rep)
    download = next(s for s in rep["steps"] if s.get("uses", "").startswith("actions/download-artifact"))
    assert download["with"]["merge-multiple"] is True and download["with"]["path"] == "results"
    # The install steps name extras that exist, so a runner gets the engine and the plotting library.
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for job in (bench, rep):
        install = next(s["run"] for s in job["steps"] if s.get("name") == "Install")
        for spec in [w.strip("'\"") for w in install.split() if w.strip("'\"").startswith(".[")]:
            assert set(spec[2:-1].split(",")) <= set(extras), spec
    assert set(LOCAL_ENV) <= set(wf["env"])


def _commands(job: dict, runner: str) -> list[str]:
    """The job's shell steps (install excluded: this environment is installed), matrix values filled in."""
    out = []
    for step in job["steps"]:
        if "run" not in step or step.get("name") == "Install":
            continue
        cmd = step["run"].replace("${{ matrix.runner }}", runner)
        assert "${{" not in cmd, f"unexpanded expression in {step.get('name')}: {cmd}"
        out.append(cmd)
    return out


def _run(cmd: str, cwd: Path, env: dict) -> None:
    # GitHub runs `shell: bash` steps as: bash --noprofile --norc -eo pipefail {0}
    script = cwd / ".step.sh"
    script.write_text(cmd)
    proc = subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", str(script)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"step failed:\n{cmd}\n--- stdout\n{proc.stdout[-2000:]}\n--- stderr\n{proc.stderr[-2000:]}"


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("pack") is None, reason="needs bash and the pack script")
def test_jobs_run_locally(wf, tmp_path):
    env = {**os.environ, **{k: str(v) for k, v in wf["env"].items()}, **LOCAL_ENV}
    assert not any("${{" in v for k, v in env.items() if k in wf["env"]), "an env value is left unexpanded"
    env["GITHUB_STEP_SUMMARY"] = str(tmp_path / "summary.md")

    def checkout(where: Path) -> Path:  # what actions/checkout leaves for these commands
        (where / "benchmarks").mkdir(parents=True)
        shutil.copy(ROOT / "benchmarks" / "matrix.toml", where / "benchmarks" / "matrix.toml")
        shutil.copytree(ROOT / "benchmarks" / "results", where / "benchmarks" / "results")
        return where

    runner = "ubuntu-latest"
    bench_dir = checkout(tmp_path / "bench")
    for cmd in _commands(wf["jobs"]["bench"], runner):
        _run(cmd, bench_dir, env)
    results = bench_dir / "results" / f"matrix-{runner}.jsonl"
    recs = [json.loads(line) for line in results.read_text().splitlines()]
    assert [(r["status"], r["test"], r["runner"], r["target"]) for r in recs] == [
        ("ok", "pp16", runner, "laptop"), ("ok", "tg4", runner, "laptop")]
    assert "| ubuntu-latest | smollm2-135m | laptop |" in (bench_dir / f"report-{runner}" / "report.md").read_text()

    # upload-artifact + download-artifact(merge-multiple) = the runners' results/ merged into one results/
    report_dir = checkout(tmp_path / "report")
    shutil.copytree(bench_dir / "results", report_dir / "results")
    for cmd in _commands(wf["jobs"]["report"], runner):
        _run(cmd, report_dir, env)
    summary = (tmp_path / "summary.md").read_text()
    assert "# edgepack device matrix" in summary and "| ubuntu-latest | smollm2-135m | laptop | Q4_1 | tg4 |" in summary
    for png in ("tokens_per_s.png", "peak_memory.png", "predicted_vs_measured.png"):
        assert (report_dir / "report" / png).read_bytes()[:4] == b"\x89PNG"
