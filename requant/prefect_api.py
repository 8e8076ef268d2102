"""Which Prefect API a CLI command talks to.

``PREFECT_API_URL`` when it is set; else the project's own server, the one ``make prefect-up``
(scripts/prefect_server.sh, also run by ``make demo``) started and recorded in
``.cache/prefect/api-url`` of the checkout, when it answers; else Prefect's temporary server for
the one command, said in one line with how to get runs into the UI instead. Chosen before
Prefect is imported, so Prefect reads the address as if the operator had exported it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from requant.settings import PROJECT_ROOT

#: Written by scripts/prefect_server.sh start, removed by stop.
RECORD = PROJECT_ROOT / ".cache" / "prefect" / "api-url"
#: Only a server on this host, as the script starts it: the record is a file in the checkout.
_LOCAL_API = re.compile(r"^http://127\.0\.0\.1:[0-9]{1,5}/api$")


def choose_api(record: Path = RECORD) -> str:
    """Set ``PREFECT_API_URL`` to the project's server if it is up and none is set; one line
    saying which API this command uses."""
    if url := os.environ.get("PREFECT_API_URL"):
        return f"Prefect API: {url} (PREFECT_API_URL)"
    url = _recorded(record)
    if url and healthy(url):
        os.environ["PREFECT_API_URL"] = url
        return f"Prefect API: the project's server, {url.removesuffix('/api')} (UI)"
    return ("Prefect API: a temporary server for this command only (its runs do not appear in "
            "a UI); start the project's with `make prefect-up` and run the command again to "
            "see them there")


def _recorded(record: Path) -> str | None:
    try:
        url = record.read_text().strip()
    except OSError:
        return None
    return url if _LOCAL_API.fullmatch(url) else None


def healthy(url: str, timeout_s: float = 2.0) -> bool:
    import httpx

    try:
        return httpx.get(f"{url}/health", timeout=timeout_s).status_code == 200
    except httpx.HTTPError:
        return False
