"""scripts/setup_envs.sh refuses a disk too small for the environments before installing
anything (a CI run once died of "No space left on device" halfway through two pip installs)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

from tests.conftest import ROOT


def test_a_disk_too_small_for_both_environments_is_refused_in_one_line_before_any_install(
        tmp_path):
    free_gib = shutil.disk_usage(tmp_path).free // 2**30
    # each environment alone would fit; both (the other one is not made yet) do not
    env = {**os.environ, "REQUANT_VENVS": str(tmp_path / "venvs"),
           "REQUANT_ENV_DISK_GIB": f"{free_gib // 2 + 1} {free_gib // 2 + 1}"}
    done = subprocess.run(["scripts/setup_envs.sh", "pipeline"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert re.match(rf"error: {re.escape(str(tmp_path / 'venvs'))} has \d+ GiB free; making "
                    rf"the pipeline environment needs about {2 * (free_gib // 2 + 1)} GiB", line)
    assert "point REQUANT_VENVS at a larger disk" in line
    assert list((tmp_path / "venvs").iterdir()) == []  # nothing was installed
