"""The README quotes measurements only from the committed result files it cites.

Within each ``## `` section, a number with a unit of time, memory or rate (``246 ms``, ``1,304 MiB``,
``17.2 s``) must appear, as written, in a Markdown result file cited in that section at or before
its paragraph (``benchmarks/results/<name>.md``, or ``...<end of a name>.md`` for the one file so
ending), or match a value of a cited JSON file rounded as the README rounds it. A re-run that
changes a file without the README, or a number typed from memory, fails here. Ratios (``29×``)
are derived and not checked.
"""

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"

QUANTITY = re.compile(r"(?<![\w.])(\d[\d,]*(?:\.\d+)?) ?(ms|s|MiB|GiB|GFLOP/s)(?!\w)")
CITATION = re.compile(r"`(?:benchmarks/results/)?((?:\.\.\.)?[\w.-]+\.(?:md|json|png))`")


def _resolve(name: str) -> Path | None:
    if name.startswith("..."):
        matches = [p for p in RESULTS.iterdir() if p.name.endswith(name[3:])]
        return matches[0] if len(matches) == 1 else None
    path = RESULTS / name
    return path if path.exists() else None


def _json_numbers(path: Path) -> list[float]:
    found = []

    def walk(value):
        if isinstance(value, bool):
            return
        if isinstance(value, (int, float)):
            found.append(float(value))
        elif isinstance(value, dict):
            for item in value.values():
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)

    walk(json.loads(path.read_text()))
    return found


def _quoted(value: str, unit: str, markdown: str, numbers: list[float]) -> bool:
    if f"{value} {unit}" in markdown or f"{value}{unit}" in markdown:
        return True
    decimals = len(value.partition(".")[2])
    target = float(value.replace(",", ""))
    return any(round(x, decimals) == target for x in numbers)


def unquoted_numbers(readme: str) -> list[str]:
    """'section | value unit' for every quantity of the README that its cited files do not hold."""
    missing = []
    for section in re.split(r"\n(?=## )", readme):
        title = section.splitlines()[0]
        cited: list[Path] = []
        for paragraph in section.split("\n\n"):
            cited += [p for p in map(_resolve, CITATION.findall(paragraph)) if p is not None and p not in cited]
            markdown = "\n".join(p.read_text() for p in cited if p.suffix == ".md")
            numbers = [x for p in cited if p.suffix == ".json" for x in _json_numbers(p)]
            missing += [f"{title} | {value} {unit}" for value, unit in QUANTITY.findall(paragraph)
                        if not _quoted(value, unit, markdown, numbers)]
    return missing


def test_readme_numbers_come_from_the_result_files_it_cites():
    readme = (ROOT / "README.md").read_text()
    assert QUANTITY.findall(readme), "the README quotes no measurements: this test checks nothing"
    assert unquoted_numbers(readme) == []


def test_a_number_no_cited_file_holds_is_caught():
    table = sorted(RESULTS.glob("cpu-*.md"))[-1]
    quantity = " ".join(QUANTITY.search(table.read_text()).groups())
    cited = f"## Benchmarks\n\nFrom `benchmarks/results/{table.name}`: {quantity}.\n\nAlso"
    assert unquoted_numbers(f"{cited} {quantity}.\n") == []
    assert unquoted_numbers(f"{cited} 987654.3 ms.\n") == ["## Benchmarks | 987654.3 ms"]
    # a number before any citation of its section
    later = f"## Speed\n\nIt takes {quantity}.\n\nFrom `benchmarks/results/{table.name}`: {quantity}.\n"
    assert unquoted_numbers(later) == [f"## Speed | {quantity}"]
    # an abbreviated name, and a JSON value as the README rounds it
    run = RESULTS / "trainer-default-run-2026-11-24.json"
    seconds = json.loads(run.read_text())["wall_seconds"]
    assert unquoted_numbers(f"## T\n\n`...{run.name[-20:]}`: {seconds:.0f} s, not {seconds + 7:.0f} s.\n") == [
        f"## T | {seconds + 7:.0f} s"]
