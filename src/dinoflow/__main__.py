"""``python -m dinoflow`` runs the Kedro project like ``kedro run``."""

import sys
from pathlib import Path


def main(*args, **kwargs):
    from kedro.framework.cli.utils import find_run_command
    from kedro.framework.project import configure_project

    configure_project(Path(__file__).parent.name)
    kwargs["standalone_mode"] = not hasattr(sys, "ps1")
    return find_run_command("dinoflow")(*args, **kwargs)


if __name__ == "__main__":
    main()
