"""scripts/bench.py holds what the docs report: every part it has is the source of a figure a
docs page shows, and every bench command the docs show names parts it has."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_BENCH_COMMAND = re.compile(r"scripts/bench\.py((?: --[\w-]+(?: [\w,.-]+)?)*)")


def _bench_parts() -> list[str]:
    spec = importlib.util.spec_from_file_location("bench_script", ROOT / "scripts" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ALL


def _parts_in_commands() -> dict[str, set[str]]:
    """Part name -> the pages whose `scripts/bench.py --parts ...` commands name it."""
    named: dict[str, set[str]] = {}
    for page in PAGES:
        for match in _BENCH_COMMAND.finditer(page.read_text()):
            words = match.group(1).split()
            for flag, value in zip(words, words[1:], strict=False):
                if flag == "--parts":
                    for part in value.split(","):
                        named.setdefault(part, set()).add(page.name)
    return named


def _parts_in_performance_table() -> set[str]:
    """The `part` column of docs/performance.md's figures table."""
    lines = (ROOT / "docs" / "performance.md").read_text().splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| figure |"))
    column = lines[header].strip("|").split("|").index(" part ")
    parts = set()
    for line in lines[header + 2:]:
        if not line.startswith("|"):
            break
        parts.add(line.strip("|").split("|")[column].strip().strip("`"))
    return parts


def test_every_bench_command_in_the_docs_names_parts_bench_py_has():
    unknown = {part: pages for part, pages in _parts_in_commands().items()
               if part not in _bench_parts()}
    assert not unknown, f"docs name bench parts that scripts/bench.py does not have: {unknown}"


def test_every_performance_figure_names_the_part_that_measures_it():
    assert _parts_in_performance_table() <= set(_bench_parts())


def test_every_bench_part_is_the_source_of_a_figure_the_docs_show():
    reported = _parts_in_performance_table() | set(_parts_in_commands())
    unreported = set(_bench_parts()) - reported
    assert not unreported, (f"bench parts no docs page reports a figure of: {sorted(unreported)}; "
                            "drop them or document what they measure")
