"""Fixtures of the end-to-end tests: servers, browsers, killed and distributed jobs."""

import os

import pytest


def _stop_process_group(proc) -> None:
    """Stop a server started with ``start_new_session=True`` and every process of its group
    (workers outlive a stopped parent): SIGTERM, then SIGKILL."""
    import signal
    import subprocess

    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=20)
            break
        except subprocess.TimeoutExpired:
            continue



@pytest.fixture(scope="session")
def stop_process_group():
    """The function ``stop_process_group(proc)``: stops a server started with
    ``start_new_session=True`` and every process of its group (SIGTERM, then SIGKILL)."""
    return _stop_process_group
