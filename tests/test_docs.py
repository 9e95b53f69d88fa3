"""The README and docs/ show real commands: a page that names a make target, a module, an experiment, a config key,
a command-line flag, a file or a link that does not exist fails here rather than in a reader's shell.

What is checked, and why this way:
- fenced ```bash blocks are the commands a reader copies, so each of their lines is parsed (shlex, comments and
  line continuations handled): `make` lines name Makefile targets (parsed from the Makefile, so a new target needs no
  list here), `python -m covidct.X` names a module that exists, and config-group choices (`experiment=`, `+protocol=`,
  `PROTOCOL=`, ...) name files in conf/;
- every `python -m covidct.run` line, and the Hydra overrides a `make train|table1|loso` line passes, is composed with
  Hydra's compose API (in process, a fraction of a second each), so a key that is not in the config fails as it would
  on the command line; lines with placeholders (DIR, PATH, ...) are only checked, not composed;
- `--flags` of the argparse commands are looked up in their own `--help`, so a renamed flag fails;
- inline `code` in the prose is checked for make targets, modules, config-group choices and repository paths, which
  are cheap to check and go stale silently;
- a handful of cheap commands run for real, through `sys.executable`;
- relative links and their #anchors resolve (GitHub's heading slugs), docs/architecture.md lists every module under
  covidct/, the method of docs/extending.md is the one tests/test_new_method.py trains, and the README stays short.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
README_MAX_LINES = 210
# a word that stands for something the reader fills in: such a line is checked, not composed or run
PLACEHOLDER = re.compile(r"\.\.\.|<|\b(?:DIR|PATH|RUN|FILE|NAME|SITE|N)\b")
# config groups whose every choice is a file in conf/ (hydra/launcher=joblib is a plugin's, so not listed)
GROUPS = {
    "experiment": "experiment",
    "+experiment": "experiment",
    "protocol": "protocol",
    "+protocol": "protocol",
    "trainer": "trainer",
    "logger": "logger",
    "model/scheduler": "model/scheduler",
    "model/backbone": "model/backbone",
    "data": "data",
    "model": "model",
    "callbacks": "callbacks",
}
# make variables that name a config file, and the Hydra arguments each target passes on
MAKE_GROUP_VARIABLES = {"PROTOCOL": "protocol", "LOSO_EXPERIMENTS": "experiment"}
MAKE_HYDRA_VARIABLES = {"train": "ARGS", "table1": "HYDRA_ARGS", "loso": "HYDRA_ARGS"}
ARGPARSE_COMMANDS = {"covidct.report", "covidct.data", "covidct.bench", "covidct.experiments"}
REPO_PATH = re.compile(r"^(?:covidct|conf|tests|experiments|docs|\.ci)(?:/[A-Za-z0-9_.-]+)*/?$")


@dataclass(frozen=True)
class Line:
    """One command of a page: where it is, and its words."""

    page: Path
    number: int
    text: str
    words: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.number}: {self.text}"


def fenced_blocks(page: Path) -> Iterator[tuple[str, int, list[str]]]:
    """(language, first line number, lines) of every fenced block of a Markdown page."""
    lines = page.read_text().splitlines()
    i = 0
    while i < len(lines):
        opening = re.match(r"^\s*```(\S*)", lines[i])
        if not opening:
            i += 1
            continue
        language, start, body = opening.group(1), i + 2, []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith("```"):
            body.append(lines[i])
            i += 1
        yield language, start, body
        i += 1


def prose(page: Path) -> str:
    """The page without its fenced blocks (whose contents are not headings or inline code)."""
    text = page.read_text()
    return re.sub(r"^\s*```.*?^\s*```[^\n]*$", "", text, flags=re.S | re.M)


def bash_lines(page: Path) -> Iterator[Line]:
    """The commands of a page's ```bash blocks, continuation lines joined, comments dropped."""
    for language, start, body in fenced_blocks(page):
        if language != "bash":
            continue
        pending, first = "", start
        for offset, raw in enumerate(body):
            if not pending:
                first = start + offset
            pending += raw.rstrip()
            if pending.endswith("\\"):
                pending = pending[:-1] + " "
                continue
            if pending.strip() and not pending.lstrip().startswith("#"):
                yield Line(page, first, pending.strip(), tuple(shlex.split(pending, comments=True)))
            pending = ""


def inline_spans(page: Path) -> Iterator[Line]:
    """Inline `code` of a page's prose, as words (a span shlex cannot split is kept as one word)."""
    for match in re.finditer(r"`([^`\n]+)`", prose(page)):
        text = match.group(1)
        try:
            words = tuple(shlex.split(text))
        except ValueError:
            words = (text,)
        number = page.read_text()[: page.read_text().find(text)].count("\n") + 1
        yield Line(page, number, text, words)


def all_lines(spans: bool = True) -> list[Line]:
    return [line for page in PAGES for line in (*bash_lines(page), *(inline_spans(page) if spans else ()))]


def command(words: tuple[str, ...]) -> tuple[str, list[str]] | None:
    """('make', args) or ('covidct.X', args) for a make or `python -m covidct.X` command (after any VAR=value
    environment words), else None."""
    i = 0
    while i < len(words) and re.match(r"^[A-Z_][A-Z0-9_]*=", words[i]):
        i += 1
    rest = list(words[i:])
    if rest[:1] == ["make"]:
        return "make", rest[1:]
    if len(rest) >= 3 and Path(rest[0]).name.startswith("python") and rest[1] == "-m" and rest[2].startswith("covidct"):
        return rest[2], rest[3:]
    return None


@cache
def make_targets() -> frozenset[str]:
    """The Makefile's targets (rules, not variable assignments; `$(VENV)/.installed` and .PHONY left out)."""
    targets = set()
    for line in (REPO / "Makefile").read_text().splitlines():
        if line.startswith(("\t", "#", " ")):
            continue
        rule = re.match(r"^([^:=#\s][^:=#]*?)\s*:(?![=:])", line)
        if rule:
            targets.update(t for t in rule.group(1).split() if "$" not in t and not t.startswith("."))
    return frozenset(targets)


def make_parts(args: list[str]) -> tuple[list[str], dict[str, str]]:
    """A make line's targets (the default goal where it names none) and its variable assignments."""
    variables = dict(a.split("=", 1) for a in args if re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", a))
    targets = [a for a in args if not a.startswith("-") and "=" not in a]
    return targets or ["setup"], variables


def module_exists(module: str) -> bool:
    path = REPO.joinpath(*module.split("."))
    return path.with_suffix(".py").is_file() or (path / "__main__.py").is_file()


def top_level_split(value: str, separators: str = ",") -> list[str]:
    """`value` split at separators outside brackets, braces and quotes (a Hydra sweep `a,b`, not `[a,b]`)."""
    parts, depth, current, quote = [], 0, "", ""
    for char in value:
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[{(":
            depth += 1
        elif char in "]})":
            depth -= 1
        elif char in separators and depth == 0:
            parts.append(current)
            current = ""
            continue
        current += char
    return [*parts, current]


def group_choices(words: tuple[str, ...] | list[str]) -> Iterator[tuple[str, str]]:
    """(config group, choice) for every `group=choice` word of a config group whose choices are files."""
    for word in words:
        key, sep, value = word.partition("=")
        if sep and key in GROUPS and not PLACEHOLDER.search(value) and "$" not in value:
            for choice in top_level_split(value, ",|"):
                if choice and choice != "null":
                    yield GROUPS[key], choice


def hydra_composes(overrides: list[str]) -> str | None:
    """None if `python -m covidct.run OVERRIDES` composes, else Hydra's message."""
    from hydra import compose, initialize_config_dir

    try:
        with initialize_config_dir(str(CONF), version_base="1.3"):
            compose("config", overrides=overrides, return_hydra_config=True)
    except Exception as err:  # Hydra's composition errors have no common base we could name
        return f"{type(err).__name__}: {err}".splitlines()[0]
    return None


def run_overrides(args: list[str]) -> list[str] | None:
    """The overrides a `python -m covidct.run` line composes (a multirun's first job), or None for a line with
    placeholders or another config folder, which only the other checks cover."""
    if any(a in ("--config-dir", "-cd", "--config-path", "-cp") for a in args):
        return None
    overrides = [a for a in args if "=" in a and not a.startswith("-")]
    if any(PLACEHOLDER.search(o) for o in overrides):
        return None
    multirun = "-m" in args or "--multirun" in args
    first = [o.split("=", 1)[0] + "=" + top_level_split(o.split("=", 1)[1])[0] if multirun else o for o in overrides]
    return [o[1:] if o.startswith("+experiment=") else o for o in first]  # as covidct.run accepts it


@cache
def help_text(module: str, subcommand: str | None) -> str:
    """An argparse command's --help, in process (the modules are imported by other tests anyway)."""
    import importlib

    name = module + ".__main__" if (REPO.joinpath(*module.split(".")) / "__main__.py").is_file() else module
    main = importlib.import_module(name).main
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        main([subcommand, "--help"] if subcommand else ["--help"])
    return out.getvalue()


# The commands -----------------------------------------------------------------------------------------------------
def test_every_make_line_names_a_makefile_target_and_its_config_files():
    problems = []
    for line in all_lines():
        found = command(line.words)
        if not found or found[0] != "make":
            continue
        targets, variables = make_parts(found[1])
        problems += [f"{line}: no Makefile target {t!r}" for t in targets if t not in make_targets()]
        for variable, group in MAKE_GROUP_VARIABLES.items():
            value = variables.get(variable, "")
            for choice in top_level_split(value) if value and not PLACEHOLDER.search(value) else []:
                if not (CONF / group / f"{choice}.yaml").is_file():
                    problems.append(f"{line}: {variable}={value}: no conf/{group}/{choice}.yaml")
    assert not problems, "\n".join(problems)


def test_every_python_m_names_an_existing_module():
    problems = [
        f"{line}: no module {found[0]}"
        for line in all_lines()
        if (found := command(line.words))
        and found[0] != "make"
        and re.fullmatch(r"[a-z_.]+", found[0])  # not a placeholder such as covidct.<module>
        and not module_exists(found[0])
    ]
    assert not problems, "\n".join(problems)


def elsewhere(words: tuple[str, ...]) -> bool:
    """Whether a line adds another config folder, whose files this repository does not hold."""
    return any(w.startswith(("hydra.searchpath=", "--config-dir", "-cd")) for w in words)


def test_every_config_group_choice_names_a_file_in_conf():
    problems = [
        f"{line}: {group}={choice}, but there is no conf/{group}/{choice}.yaml"
        for line in all_lines()
        if not elsewhere(line.words)
        for group, choice in group_choices(line.words)
        if not (CONF / group / f"{choice}.yaml").is_file()
    ]
    assert not problems, "\n".join(problems)


def test_every_run_line_and_every_makes_hydra_arguments_compose():
    """What Hydra itself would refuse: an unknown key (`model.tua=0.1`), a missing group choice, a bad sweep."""
    problems, composed = [], 0
    for line in all_lines(spans=False):
        found = command(line.words)
        if found is None:
            continue
        module, args = found
        if module == "covidct.run":
            overrides = run_overrides(args)
        elif module == "make":
            targets, variables = make_parts(args)
            passed = [variables.get(MAKE_HYDRA_VARIABLES[t], "") for t in targets if t in MAKE_HYDRA_VARIABLES]
            protocol = variables.get("PROTOCOL", "cpu" if "train" in targets else "paper")
            extra = [o for value in passed for o in shlex.split(value)]
            overrides = None if not extra else ["experiment=ours", f"+protocol={protocol}", *extra]
            overrides = None if overrides and any(PLACEHOLDER.search(o) for o in overrides) else overrides
        else:
            continue
        if overrides is None:
            continue
        composed += 1
        message = hydra_composes(overrides)
        if message:
            problems.append(f"{line}: {message}")
    assert not problems, "\n".join(problems)
    assert composed >= 10, f"only {composed} lines composed: the parser no longer finds the docs' run lines"


def test_every_flag_of_an_argparse_command_is_in_its_help():
    problems = []
    for line in all_lines():
        found = command(line.words)
        if not found or found[0] not in ARGPARSE_COMMANDS:
            continue
        module, args = found
        subcommand = args[0] if module == "covidct.data" and args and not args[0].startswith("-") else None
        flags = {a.strip("[]").split("=", 1)[0] for a in args if a.lstrip("[").startswith("--")}  # [--opt X] too
        known = help_text(module, subcommand)
        problems += [f"{line}: {module} {subcommand or ''} has no {f}" for f in sorted(flags) if f not in known]
    assert not problems, "\n".join(problems)


def _run(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "COVIDCT_OUTPUTS": str(tmp_path / "outputs")}
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_the_experiment_list_the_docs_show_is_the_registry(tmp_path: Path):
    result = _run("covidct.experiments", tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    names = result.stdout.strip().split(",")
    assert "ours" in names and all((CONF / "experiment" / f"{n}.yaml").is_file() for n in names), names


@pytest.mark.parametrize(
    ("args", "status", "shows"),
    [
        (("covidct.run", "experiment=ours", "--cfg", "job"), 0, "_target_: covidct.methods.Ours"),
        (("covidct.report", "--help"), 0, "--runs"),
        (("covidct.data", "--help"), 0, "check"),
        (("covidct.data", "where", "--root", "{empty}"), 1, "is incomplete"),
    ],
    ids=["run --cfg job", "report --help", "data --help", "data where (missing data: exit 1)"],
)
def test_cheap_commands_of_the_docs_run(args: tuple[str, ...], status: int, shows: str, tmp_path: Path):
    args = tuple(a.format(empty=tmp_path) for a in args)
    result = _run(*args, tmp_path=tmp_path)
    assert result.returncode == status, result.stderr[-2000:]
    assert shows in result.stdout, result.stdout[-2000:]


# The pages --------------------------------------------------------------------------------------------------------
def test_the_readme_stays_short():
    lines = len((REPO / "README.md").read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail into docs/"


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation (backticks included) dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@cache
def anchors(page: Path) -> frozenset[str]:
    seen: dict[str, int] = {}
    found = set()
    for match in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", prose(page), flags=re.M):
        base = slug(match.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return frozenset(found)


def test_every_relative_link_and_anchor_resolves():
    problems = []
    for page in PAGES:
        for match in re.finditer(r"\[[^\]]*\]\(([^)\s]+)\)", prose(page)):
            target = match.group(1)
            if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            where = f"{page.relative_to(REPO)}: ({target})"
            if not file.exists():
                problems.append(f"{where}: {path} does not exist")
            elif anchor and file.suffix == ".md" and anchor not in anchors(file):
                problems.append(f"{where}: {file.relative_to(REPO)} has no heading #{anchor}")
    assert not problems, "\n".join(problems)


def test_every_repository_path_the_pages_name_exists():
    problems = [
        f"{line}: {word} does not exist"
        for line in all_lines()
        for word in (w.rstrip(",;:).") for w in line.words)
        if REPO_PATH.match(word) and not (REPO / word).exists()
    ]
    assert not problems, "\n".join(problems)


def test_the_architecture_page_lists_every_module_and_no_other():
    text = (REPO / "docs" / "architecture.md").read_text()
    named = set(re.findall(r"covidct/[\w/]+\.py", text))
    modules = {str(p.relative_to(REPO)) for p in (REPO / "covidct").rglob("*.py")}
    assert not modules - named, f"docs/architecture.md does not list {sorted(modules - named)}"
    assert not named - modules, f"docs/architecture.md names modules that do not exist: {sorted(named - modules)}"


def test_the_method_the_extending_page_shows_is_the_one_the_toy_method_test_trains():
    blocks = {language: "\n".join(body) for language, _, body in fenced_blocks(REPO / "docs" / "extending.md")}
    test_source = (REPO / "tests" / "test_new_method.py").read_text()
    assert blocks["python"].strip() and blocks["python"] in test_source
    experiment = next(
        "\n".join(body) for language, _, body in fenced_blocks(REPO / "docs" / "extending.md") if language == "yaml"
    )
    assert experiment in test_source
