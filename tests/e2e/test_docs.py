"""The documentation stands on its own: README.md and docs/ link and name only what the repository
holds, no file refers to anything outside it, and the README's commands and metric keys exist."""

from __future__ import annotations

import copy
import functools
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = [README, *sorted((ROOT / "docs").rglob("*.md"))]

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
# a path from the repository root: a tracked top-level folder or file, then path characters
PATH = re.compile(r"(?<![\w./-])((?:src|conf|pipelines|tests|docs|benchmarks|experiments|\.ci)/[\w./<>*{}-]*"
                  r"|Makefile|dvc\.yaml|pyproject\.toml|setup\.py|LICENSE|CITATION\.cff)")
CODE_SPAN = re.compile(r"`([^`]+)`")
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
# names of files that exist only outside the repository (built here so this file does not match)
OUTSIDE = ["../" + "shared", "DINOV2" + ".md", "CONTRACT" + ".md", "LAYOUT-SKETCH" + ".md"]


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(md: Path) -> set[str]:
    text = FENCE.sub("", md.read_text())
    return {_slug(m) for m in re.findall(r"^#{1,6} (.+)$", text, re.M)}


def _links(md: Path) -> list[str]:
    return LINK.findall(FENCE.sub("", md.read_text()))


def _repo_files() -> list[Path]:
    """Tracked files and new ones git does not ignore (a clean clone: the tracked ones)."""
    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
                             cwd=ROOT, capture_output=True, text=True, check=True).stdout
        files = [ROOT / name for name in out.split("\0") if name]
    except (OSError, subprocess.CalledProcessError):  # no git: the tree without its outputs
        skip = {".git", ".venv", "data", "mlruns", "logs", "build"}
        files = [p for p in ROOT.rglob("*") if not skip & set(p.relative_to(ROOT).parts)]
    return [f for f in files if f.is_file()]


def _text(path: Path) -> str | None:
    if path.stat().st_size > 2_000_000:
        return None
    data = path.read_bytes()
    if b"\0" in data[:8192]:
        return None
    return data.decode("utf-8", errors="replace")


def _link_problems(md: Path, root: Path = ROOT) -> list[str]:
    problems = []
    for target in _links(md):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        name, _, anchor = target.partition("#")
        path = (md.parent / name).resolve() if name else md
        where = f"{md.relative_to(root)}: {target}"
        if not path.is_relative_to(root):
            problems.append(f"{where} leaves the repository")
        elif not path.exists():
            problems.append(f"{where} does not exist")
        elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
            problems.append(f"{where}: no heading #{anchor}")
    return problems


@pytest.mark.parametrize("md", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves_inside_the_repository(md: Path) -> None:
    assert _link_problems(md) == []


def test_the_link_check_can_fail(tmp_path: Path) -> None:
    (tmp_path / "outside.md").write_text("# Outside\n")
    repo = tmp_path / "repo"
    (repo / "docs").mkdir(parents=True)
    (repo / "docs" / "method.md").write_text("# The method\n\n## References\n")
    page = repo / "docs" / "page.md"
    page.write_text("[up](../../outside.md) [gone](missing.md) [anchor](method.md#no-such-heading)\n"
                    "[fine](method.md#references) [web](https://example.org/x.md)\n")
    problems = _link_problems(page, repo)
    assert len(problems) == 3
    assert "leaves the repository" in problems[0]
    assert "does not exist" in problems[1] and "no heading" in problems[2]


def _named_paths(text: str) -> set[str]:
    found = set()
    for raw in PATH.findall(text):
        path = raw.rstrip(".,:;")
        if re.search(r"[<>*{}]", path):  # a pattern or placeholder, not a file
            continue
        found.add(path.split("::")[0])
    return found


@pytest.mark.parametrize("md", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_file_path_named_in_the_docs_exists(md: Path) -> None:
    text = md.read_text()
    missing = sorted(p for p in _named_paths(text) if not (ROOT / p).exists())
    assert missing == []


def test_the_path_check_finds_paths_in_prose_and_code() -> None:
    text = "see `conf/base/parameters_pretrain.yml`, and src/dinoflow/config.py. Not conf/<env>/x."
    assert _named_paths(text) == {"conf/base/parameters_pretrain.yml", "src/dinoflow/config.py"}


def test_no_file_refers_to_anything_outside_the_repository() -> None:
    found = []
    for path in _repo_files():
        text = _text(path)
        if text is None:
            continue
        for name in OUTSIDE:
            if name in text:
                found.append(f"{path.relative_to(ROOT)}: {name}")
        if path.suffix == ".md":
            found += [p for p in _link_problems(path) if "leaves the repository" in p]
    assert found == []


def test_docs_for_users_and_for_developers_are_apart() -> None:
    """One page per topic: the architecture page (where a new method, data source or evaluation
    task goes) is docs/architecture.md, the measurement history in docs/dev/, and the README
    links every page."""
    assert (ROOT / "docs" / "architecture.md").is_file()
    assert not (ROOT / "docs" / "dev" / "architecture.md").exists()
    links = {link.partition("#")[0] for link in _links(README)}
    for page in (ROOT / "docs").rglob("*.md"):
        assert str(page.relative_to(ROOT)) in links, f"the README does not link {page}"


def test_readme_is_a_short_user_guide() -> None:
    text = README.read_text()
    assert len(text.splitlines()) <= 300
    first = FENCE.search(text).group(1).split("\n")
    assert first[0].startswith("make run") and first[1].startswith("make test")
    # measurement history lives in docs/results.md
    assert not re.search(r"\b20\d\d-\d\d-\d\d\b", text)
    assert not re.search(r"\b(issue \d+|session)\b", text, re.I)


def test_license_and_citation() -> None:
    license_text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    assert "END OF TERMS AND CONDITIONS" in license_text
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert cff["cff-version"] == "1.2.0" and cff["license"] == "Apache-2.0"
    assert any("DINOv2" in ref["title"] for ref in cff["references"])


# ---------------------------------------------------------------- commands in the README
def _makefile() -> tuple[dict[str, str], dict[str, str]]:
    """(target -> recipe, variable -> value) of the Makefile."""
    targets, variables, current = {}, {}, None
    for line in (ROOT / "Makefile").read_text().splitlines():
        if m := re.match(r"^([A-Za-z_][\w-]*)\s*(?:\?|:)?=\s*(.*)$", line):
            variables[m.group(1)] = m.group(2).strip()
            current = None
        elif m := re.match(r"^([a-z][\w-]*):(?!=)", line):
            current = m.group(1)
            targets[current] = ""
        elif current and line.startswith("\t"):
            targets[current] += line.strip() + "\n"
    return targets, variables


def _section(text: str, title: str) -> str:
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert match, f"no section '## {title}'"
    return match.group(1)


def _commands(text: str) -> list[str]:
    """Shell commands of fenced blocks (continuations joined, comments dropped) and code spans."""
    found = []
    for block in FENCE.findall(text):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line:
                found.append(line)
    prose = FENCE.sub("", text)
    found += [" ".join(span.split()) for span in CODE_SPAN.findall(prose)]
    return found


def _kedro_options(command: str) -> dict[str, list[str]]:
    words = shlex.split(command)
    options: dict[str, list[str]] = {"env": [], "pipelines": [], "params": []}
    i = 2
    while i < len(words):
        word = words[i]
        name, eq, value = word.partition("=")
        key = name.lstrip("-")
        if key in ("env", "pipelines", "pipeline", "params", "config", "e"):
            if not eq:
                i += 1
                value = words[i] if i < len(words) else ""
            options.setdefault({"pipeline": "pipelines", "e": "env"}.get(key, key), []).append(value)
        i += 1
    return options


@functools.cache
def _parameters(env: str | None) -> dict[str, Any]:
    """The parameters Kedro merges for ``env`` (conf/base under it), with the project's settings."""
    from kedro.config import OmegaConfigLoader

    from dinoflow import settings

    args = dict(settings.CONFIG_LOADER_ARGS)
    if env:
        args["default_run_env"] = env
    return OmegaConfigLoader(conf_source=str(ROOT / "conf"), **args)["parameters"]


def _set(params: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        params = params.setdefault(part, {})
    params[last] = value


@functools.cache
def _sections(pipeline: str) -> set[str]:
    import importlib

    from dinoflow.pipelines.validation import sections_used

    return sections_used(importlib.import_module(f"dinoflow.pipelines.{pipeline}").create_pipeline())


def _kedro_problems(command: str, pipelines: set[str]) -> list[str]:
    from dinoflow.config import ConfigError
    from dinoflow.pipelines import DEFAULT_PIPELINES
    from dinoflow.pipelines.validation import validate_run_parameters

    options = _kedro_options(command)
    problems = [f"{command}: no env {e}" for e in options["env"] if not (ROOT / "conf" / e).is_dir()]
    problems += [f"{command}: no pipeline {p}" for names in options["pipelines"]
                 for p in names.split(",") if p not in pipelines]
    if problems:
        return problems
    params = copy.deepcopy(_parameters(options["env"][-1] if options["env"] else None))
    for pair in ",".join(options["params"]).split(","):
        if "=" in pair:
            key, _, value = pair.partition("=")
            _set(params, key.strip(), yaml.safe_load(value))
    names = [p for names in options["pipelines"] for p in names.split(",")] or list(DEFAULT_PIPELINES)
    try:  # the sections the run's nodes read, as RunGuardHooks checks them
        validate_run_parameters(params, set().union(*(_sections(name) for name in names)))
    except ConfigError as exc:
        problems.append(f"{command}: {exc}")
    return problems


@pytest.fixture(scope="module")
def pipelines() -> set[str]:
    """The names Kedro's find_pipelines registers: each pipelines/<name>/ with a pipeline.py."""
    return {p.name for p in (ROOT / "pipelines").iterdir() if (p / "pipeline.py").is_file()}


def test_quick_start_commands_exist(pipelines: set[str]) -> None:
    """Every make target of the quick start exists, and the kedro runs they make are valid."""
    targets, variables = _makefile()
    commands = [c for c in _commands(_section(README.read_text(), "Quick start")) if c.startswith("make ")]
    assert {"make smoke", "make run", "make ui"} <= set(commands)
    problems = []
    for command in commands:
        target = command.split()[1]
        if target not in targets:
            problems.append(f"{command}: no such target")
            continue
        recipe = re.sub(r"\$\((\w+)\)", lambda m: variables.get(m.group(1), m.group(0)), targets[target])
        for line in recipe.splitlines():
            if line.startswith(".venv/bin/kedro run"):
                problems += _kedro_problems(line.removeprefix(".venv/bin/"), pipelines)
    assert problems == []


def test_every_make_target_and_kedro_run_in_the_docs_exists(pipelines: set[str]) -> None:
    targets, _ = _makefile()
    problems = []
    for md in DOCS:
        for command in _commands(md.read_text()):
            if re.search(r"[<>]|\.\.\.", command):  # a placeholder: `kedro run --env <env>`
                continue
            for target in re.findall(r"(?:^|\s)make ([a-z][\w-]*)", command):
                if target not in targets:
                    problems.append(f"{md.name}: {command}: no make target {target}")
            if command.startswith("kedro run"):
                problems += [f"{md.name}: {p}" for p in _kedro_problems(command, pipelines)]
    assert problems == []


def test_the_command_check_can_fail(pipelines: set[str]) -> None:
    assert _kedro_problems("kedro run --env nowhere", pipelines) == ["kedro run --env nowhere: no env nowhere"]
    assert "no pipeline pretrian" in _kedro_problems("kedro run --pipelines=pretrian", pipelines)[0]
    bad = _kedro_problems("kedro run --params pretrain.train.epoch=3", pipelines)
    assert len(bad) == 1 and "epoch" in bad[0]
    assert _kedro_problems("kedro run --env smoke --params pretrain.train.epochs=3", pipelines) == []


# ---------------------------------------------------------------- metrics.json keys
def _documented_keys() -> set[str]:
    section = _section(README.read_text(), "Outputs, and how to read them")
    keys = set()
    for span in CODE_SPAN.findall(section):
        span = span.replace("{k}", "20").replace("<class>", "shirt").replace("<key>", "knn_top1")
        if re.fullmatch(r"[a-z][a-z0-9_]*_[a-z0-9_]+|rankme|alignment|uniformity", span):
            keys.add(span)
    return keys


def test_every_metrics_json_key_is_explained_in_the_readme() -> None:
    from dinoflow.evaluation.labelfree import LABEL_FREE_KEYS
    from dinoflow.evaluation.metric_spec import _LABELLED, BASELINE_PREFIXES, is_known_metric

    keys = _documented_keys()
    # what the README names is what the evaluation writes...
    assert sorted(k for k in keys if not is_known_metric(k)) == []
    # ...and every key the evaluation can write is named
    assert set(LABEL_FREE_KEYS) <= keys
    for alternative in _LABELLED.pattern.split("|"):
        assert any(re.fullmatch(alternative, k) for k in keys), alternative
    assert {"knn_top1", "knn_top5"} <= keys
    section = _section(README.read_text(), "Outputs, and how to read them")
    for prefix in BASELINE_PREFIXES:
        assert f"`{prefix}" in section, prefix
