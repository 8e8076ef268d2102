"""The on-demand deployment's run form as the Prefect UI renders it, for docs/trust.md.

A `prefect server start` of its own on this host (a free port, a temporary PREFECT_HOME; the
UI included), the requantize flow deployed on a locked process pool
with the on-demand deployment's parameters (prefect.yaml), and headless Chromium (Debian's, as
scripts/setup_system.sh installs it) on the deployment's Custom run page.

    .venvs/pipeline/bin/python scripts/screenshot_run_form.py [--out docs/images/run-form.png]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "images" / "run-form.png")
    args = p.parse_args()
    import yaml
    from playwright.sync_api import sync_playwright
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.settings import PREFECT_API_URL, temporary_settings

    sys.path.insert(0, str(ROOT))
    from requant.flows.requantize import requantize
    from requant.job_template import lock
    from requant.serving.server import free_port

    on_demand = next(d for d in yaml.safe_load((ROOT / "prefect.yaml").read_text())
                     ["deployments"] if d["name"] == "requantize")
    prefect = str(Path(sys.executable).parent / "prefect")
    template = json.loads(subprocess.run(
        [prefect, "work-pool", "get-default-base-job-template", "--type", "process"],
        capture_output=True, text=True, check=True).stdout)
    with tempfile.TemporaryDirectory() as home, _server(prefect, Path(home), free_port()) as ui, \
            temporary_settings(updates={PREFECT_API_URL: f"{ui}/api"}):
        with get_client(sync_client=True) as client:
            client.create_work_pool(WorkPoolCreate(name="requant-gpu", type="process",
                                                   base_job_template=lock(template)))
        deployment_id = requantize.to_deployment(
            name="requantize", work_pool_name="requant-gpu",
            parameters=on_demand["parameters"], description=on_demand["description"]).apply()
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(
                executable_path=shutil.which("chromium") or "/usr/bin/chromium",
                args=["--no-sandbox", "--disable-gpu", "--no-first-run",
                      "--disable-background-networking", "--disable-component-update"])
            try:
                page = browser.new_page(viewport={"width": 1200, "height": 900})
                page.goto(f"{ui}/deployments/deployment/{deployment_id}/run",
                          wait_until="networkidle")
                try:
                    page.get_by_text("Num Samples").first.wait_for(timeout=60_000)
                finally:  # what the page shows, also when the form did not come
                    page.screenshot(path=str(args.out), full_page=True)
            finally:
                browser.close()
    print(f"wrote {args.out}")


@contextmanager
def _server(prefect: str, home: Path, port: int) -> Iterator[str]:
    """``prefect server start`` (the UI with it) until the block ends; its address."""
    import httpx

    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": f"{url}/api",
           "PREFECT_SERVER_API_HOST": "127.0.0.1", "PREFECT_SERVER_API_PORT": str(port),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    with (home / "server.log").open("wb") as log:
        proc = subprocess.Popen([prefect, "server", "start"], env=env, cwd=home, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while not _healthy(httpx, url):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("prefect server did not start: "
                                 + (home / "server.log").read_text()[-2000:])
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)


def _healthy(httpx, url: str) -> bool:
    try:
        return httpx.get(f"{url}/api/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


if __name__ == "__main__":
    main()
