"""The README and docs/ pages say what runs: every relative link leads to a file (and heading)
that exists, and every `fl-app`, `flwr run` and `scripts/local_federation.py` command in them
composes into a config that `fl_app.config` accepts, read the way the app reads it."""

from __future__ import annotations

import os
import re
import shlex
import tomllib
from itertools import chain
from pathlib import Path

import pytest
from flwr.common.config import parse_config_args
from hydra.core.override_parser.overrides_parser import OverridesParser

from fl_app.config import compose, num_supernodes, overrides_from_run_config

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]

# Commands that are examples of a shape, not runnable as written, each with the reason, keyed by
# the command's words joined (shlex.join). Nothing else needs skipping: check() reads no files
# (dataset=mnist composes offline), and resume= of a folder that does not exist composes too
# (fl-app looks for the folder only when the run starts).
SKIP: dict[str, str] = {
    "fl-app strategy=...": "a placeholder in prose: the strategy table's rows fill it in",
    "fl-app engine=flower strategy=...": "a placeholder in prose, as above",
}
# Commands the docs show being refused, each with the start of the error they document.
REFUSED: dict[str, str] = {
    "fl-app strategy=krum secagg=secaggplus":
        "secagg=secaggplus cannot run with strategy Krum: Krum scores each client's update",
}

_FENCE = re.compile(r"^\s*```(\w*)\s*$")
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
_INLINE_CODE = re.compile(r"`[^`\n]+`")
_INLINE_COMMAND = re.compile(r"`((?:\.venv/bin/)?(?:fl-app|flwr run) [^`]+)`")
_SEPARATORS = {"&&", "||", ";", "|", "&"}
_ENV_PREFIX = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


def _split_fences(text: str) -> tuple[list[tuple[int, str]], list[tuple[int, str, str]]]:
    """(prose lines, code lines with their block's language), each with its 1-based number."""
    prose, code, lang = [], [], None
    for number, line in enumerate(text.splitlines(), 1):
        fence = _FENCE.match(line)
        if fence:
            lang = None if lang is not None else fence.group(1)
        elif lang is None:
            prose.append((number, line))
        else:
            code.append((number, lang, line))
    return prose, code


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    prose, _ = _split_fences(page.read_text())
    return {_slug(line.lstrip("#")) for _, line in prose if re.match(r"#{1,6} ", line)}


def _links(page: Path) -> list[tuple[int, str]]:
    prose, _ = _split_fences(page.read_text())
    return [(n, target) for n, line in prose
            for target in _LINK.findall(_INLINE_CODE.sub("", line))
            if not re.match(r"[a-z]+:", target)]  # http:, https:, mailto: are not files


def _commands(page: Path) -> list[tuple[int, str]]:
    """Each shell command of the page's ```bash blocks, continuations joined, and each inline
    `fl-app ...` / `flwr run ...` with arguments in its prose, with its line number."""
    prose, code = _split_fences(page.read_text())
    # Prose with code lines blanked, so that a match's offset still gives its line.
    lines = dict(prose)
    text = "\n".join(lines.get(n, "") for n in range(1, max(lines, default=0) + 1))
    commands = [(text.count("\n", 0, m.start()) + 1, " ".join(m.group(1).split()))
                for m in _INLINE_COMMAND.finditer(text)]
    pending, start = "", 0
    for number, lang, line in code:
        if lang not in ("bash", "sh", "shell"):
            continue
        start = start or number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        commands.append((start, pending + line))
        pending, start = "", 0
    return commands


def _simple_commands(line: str) -> list[list[str]]:
    """The words of each simple command on a shell line (split at && ; | &), comments dropped,
    leading VAR=value assignments dropped, $VARS expanded as the shell would."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    result, words = [], []
    for token in chain(lexer, [";"]):
        if token in _SEPARATORS:
            while words and _ENV_PREFIX.match(words[0]):
                words.pop(0)
            if words:
                result.append([os.path.expandvars(w) for w in words])
            words = []
        else:
            words.append(token)
    return result


def _hydra_variants(args: list[str]) -> list[list[str]]:
    """Override lists to compose for Hydra command-line args: one, or with -m one per value of
    each sweep (the other sweeps at their first value)."""
    overrides = [a for a in args if a not in ("-m", "--multirun")]
    if len(overrides) == len(args):
        return [overrides]
    parsed = OverridesParser.create().parse_overrides(overrides)
    first = [f"{o.get_key_element()}={next(iter(o.sweep_string_iterator()))}"
             if o.is_sweep_override() else o.input_line for o in parsed]
    variants = [first]
    for i, override in enumerate(parsed):
        if override.is_sweep_override():
            for value in list(override.sweep_string_iterator())[1:]:
                variants.append([*first[:i], f"{override.get_key_element()}={value}",
                                 *first[i + 1:]])
    return variants


def _flwr_run(args: list[str]) -> tuple[list[str], dict]:
    """The app's overrides and the federation config of `flwr run` args, as Flower parses them
    (its own parse_config_args, the app's run config defaults from pyproject.toml)."""
    run_config, federation, i = [], [], 0
    while i < len(args):
        if args[i] in ("--run-config", "-c"):
            run_config.append(args[i + 1])
            i += 1
        elif args[i] == "--federation-config":
            federation.append(args[i + 1])
            i += 1
        i += 1
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    merged = {**pyproject["tool"]["flwr"]["app"]["config"], **parse_config_args(run_config)}
    return overrides_from_run_config(merged), parse_config_args(federation)


def _cases(words: list[str]) -> list[tuple[list[str], dict]] | None:
    """(overrides, federation config) to check for one simple command, or None when it is not
    one of the app's commands."""
    program = Path(words[0]).name
    if program == "fl-app":
        return [(v, {}) for v in _hydra_variants(words[1:])]
    if program == "flwr" and words[1:2] == ["run"]:
        return [_flwr_run(words[2:])]
    if program.startswith("python") and words[1:2] and words[1].endswith("local_federation.py"):
        overrides = [w for w in words[2:] if not w.startswith("-") and "=" in w]
        return [(v, {}) for v in _hydra_variants(overrides)]
    return None


def _app_commands() -> list[tuple[str, list[str]]]:
    found = []
    for page in PAGES:
        for number, line in _commands(page):
            for words in _simple_commands(line):
                if _cases(words) is not None:
                    found.append((f"{page.relative_to(ROOT)}:{number}", words))
    return found


APP_COMMANDS = _app_commands()


def _check(words: list[str]) -> None:
    for overrides, federation in _cases(words):
        cfg = compose(overrides)  # ConfigError names the bad key or value
        nodes = federation.get("num-supernodes")
        wanted = num_supernodes(cfg)
        assert nodes is None or wanted is None or nodes == wanted, (
            f"num-supernodes={nodes} but the config runs {wanted} SuperNodes")


def test_pages_are_found():
    names = {p.relative_to(ROOT).as_posix() for p in PAGES}
    assert {"README.md", "docs/configuration.md", "docs/deployment.md", "docs/privacy.md",
            "docs/results.md", "docs/performance.md", "docs/reproduction.md"} <= names
    assert len(APP_COMMANDS) >= 30  # the extraction finds the commands, not just a few


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_point_at_existing_files_and_headings(page):
    broken = []
    for number, target in _links(page):
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"line {number}: {target} (no file {file})")
        elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
            broken.append(f"line {number}: {target} (no heading #{anchor} in {file.name})")
    assert not broken, f"{page.name}: broken links: {broken}"


@pytest.mark.parametrize("where, words", APP_COMMANDS,
                         ids=[f"{w}:{shlex.join(c)[:60]}" for w, c in APP_COMMANDS])
def test_documented_command_composes(where, words, monkeypatch):
    text = shlex.join(words)
    if text in SKIP:
        pytest.skip(SKIP[text])
    # GPU commands (device=cuda, cuda:1) are checked against the machine that composes: the
    # docs' machine has two GPUs, whichever runs this test.
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    if text in REFUSED:
        from fl_app.config import ConfigError

        with pytest.raises(ConfigError, match=re.escape(REFUSED[text])):
            _check(words)
        return
    _check(words)


def test_readme_links_every_docs_page():
    readme = {t.partition("#")[0] for _, t in _links(ROOT / "README.md")}
    pages = {p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md")}
    assert pages <= readme, f"docs pages the README does not link: {sorted(pages - readme)}"


def test_a_typo_in_a_command_is_caught():
    """The check fails on a misspelled key, a wrong group choice and a federation mismatch."""
    from fl_app.config import ConfigError

    for line in ("fl-app strategy=fedsgd strategy.server_lrr=0.05",
                 "fl-app -m strategy=fedavg,fedsgdd",
                 "flwr run . --run-config \"overrides='num_rounds=5 lrr=0.1'\"",
                 "python scripts/local_federation.py modle=cnn"):
        with pytest.raises(ConfigError):
            _check(_simple_commands(line)[0])
    with pytest.raises(AssertionError, match="num-supernodes"):
        _check(_simple_commands("flwr run . --run-config \"overrides='+experiment=hospitals'\" "
                                "--federation-config \"num-supernodes=3\"")[0])
