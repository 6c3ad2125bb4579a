"""The system's Chromium for the browser tests (Debian package ``chromium``; never a downloaded
browser): module-level, as ``skipif`` markers read it at import time."""

import socket
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--headless=new", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
# the servers the browser tests start: no telemetry, one thread
ENV = {"DO_NOT_TRACK": "1", "KEDRO_DISABLE_TELEMETRY": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
       "DVC_NO_ANALYTICS": "1", "OMP_NUM_THREADS": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
