"""Maps the top-level ``pipelines/`` folder to ``dinoflow.pipelines`` (Kedro's find_pipelines).

Metadata and dependencies are in pyproject.toml; only the package list is computed here, so a
new pipeline folder or library sub-package is picked up without editing anything.
"""

from setuptools import find_packages, setup

library = find_packages("src", include=["dinoflow", "dinoflow.*"])
pipelines = ["dinoflow.pipelines"] + [f"dinoflow.pipelines.{p}" for p in find_packages("pipelines")]

setup(
    packages=library + pipelines,
    package_dir={"dinoflow": "src/dinoflow", "dinoflow.pipelines": "pipelines"},
)
