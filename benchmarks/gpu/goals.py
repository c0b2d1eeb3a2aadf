"""Issue 4's goals, judged from the JSON files of ``benchmarks/gpu/run.sh``'s goals step.

    python -m benchmarks.gpu.goals RESULT.json ...      # Markdown on stdout

Each file is one ``benchmarks.run`` of the step, told apart by its name's part
(``<device>-<date>-goals-contrastive.json``, ``-goals-symmetric``, ``-goals-structure`` and
``-goals-structure-<block elements>``). Each goal gets its measured value, its bound and a verdict,
or says what is missing (a row not measured, and why).

The issue counts the contrastive loss's forward + backward as 8·N·M·D FLOPs, DESIGN §5's count
when both inputs need gradients. With the teacher frozen the work is 6·N·M·D, which the benchmark's
tables count: a table's 45% of the matmul rate is 60% here. Peak extra memory includes the
returned gradient (N·D elements).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

CONTRASTIVE = dict(n=65536, d=768)
STRUCTURE = dict(n=32768, d=384)
ELEMENT_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


def part_of(path: Path) -> str:
    """'goals-contrastive', 'goals-structure-2097152', ... from a result file's name."""
    found = re.search(r"(goals-[a-z]+(?:-\d+)?)$", path.stem)
    return found.group(1) if found else path.stem


def load(paths: list[Path]) -> dict[str, list[dict]]:
    """Every file's rows by its part."""
    return {part_of(path): json.loads(path.read_text())["rows"] for path in paths}


def _row(rows: list[dict], loss: str, backend: str, n: int, d: int) -> tuple[dict | None, str]:
    """The measured row, or None and why not."""
    for row in rows:
        if (row["loss"], row["backend"], row["n"], row["d"]) == (loss, backend, n, d):
            return (row, "") if row["status"] == "ok" else (None, row["status"])
    return None, "not in the run"


def judge(parts: dict[str, list[dict]]) -> list[tuple[str, str, str, str]]:
    """(goal, measured, bound, verdict) for each goal of issue 4, and the gram block sizes' times."""
    verdicts = []

    def goal(name, relation, limit, unit, *needed, value):
        """``relation`` "≤" or "≥" ``limit``; ``needed``: (what, (row, why not)) for ``value``'s rows."""
        bound = f"{relation} {limit:g}{unit}"
        missing = [f"{what}: {why}" for what, (row, why) in needed if row is None]
        if missing:
            verdicts.append((name, "—", bound, "not measured (" + "; ".join(missing) + ")"))
            return
        measured = value(*(row for _, (row, _) in needed))
        met = measured <= limit if relation == "≤" else measured >= limit
        verdicts.append((name, f"{measured:.3g}{unit}", bound, "met" if met else "NOT met"))

    one = parts.get("goals-contrastive", [])
    ours = ("triton", _row(one, "contrastive", "triton", **CONTRASTIVE))
    n, d = CONTRASTIVE["n"], CONTRASTIVE["d"]
    goal("contrastive fwd+bwd, % of the bf16 mm rate (8·N·M·D FLOPs)", "≥", 60, "%", ours,
         value=lambda r: 100 * 8 * n * n * d / (r["fwd_bwd_ms"] / 1e3) / r["ceiling_flops"])
    for peer, limit in (("memeff", 0.5), ("inf-cl", 0.3)):
        goal(f"contrastive fwd+bwd time, triton / {peer}", "≤", limit, "×", ours,
             (peer, _row(one, "contrastive", peer, **CONTRASTIVE)),
             value=lambda r, p: r["fwd_bwd_ms"] / p["fwd_bwd_ms"])
    goal("contrastive peak extra memory / the inputs (student + teacher)", "≤", 2, "×", ours,
         value=lambda r: r["fwd_bwd_peak_extra_mib"] / (2 * n * d * ELEMENT_BYTES[r["dtype"]] / 2**20))
    symmetric = parts.get("goals-symmetric", [])
    goal("symmetric fwd+bwd time / one direction's (triton)", "≤", 1.6, "×",
         ("symmetric", _row(symmetric, "contrastive-symmetric", "triton", **CONTRASTIVE)), ours,
         value=lambda s, r: s["fwd_bwd_ms"] / r["fwd_bwd_ms"])
    structure = parts.get("goals-structure", [])
    gram = ("triton-gram", _row(structure, "structure-pearson", "triton-gram", **STRUCTURE))
    reference = ("reference", _row(structure, "structure-pearson", "reference", **STRUCTURE))
    goal("structure pearson fwd+bwd speed-up, reference / triton-gram", "≥", 20, "×", gram, reference,
         value=lambda g, r: r["fwd_bwd_ms"] / g["fwd_bwd_ms"])
    goal("structure pearson peak extra memory, triton-gram / reference", "≤", 1, "%", gram, reference,
         value=lambda g, r: 100 * g["fwd_bwd_peak_extra_mib"] / r["fwd_bwd_peak_extra_mib"])
    for part in sorted(p for p in parts if re.fullmatch(r"goals-structure-\d+", p)):
        row, why = _row(parts[part], "structure-pearson", "triton-gram", **STRUCTURE)
        measured = f"{row['fwd_bwd_ms']:.3g} ms, {row['fwd_bwd_peak_extra_mib']:.3g} MiB" if row else "—"
        verdicts.append((f"triton-gram in blocks of {part.rsplit('-', 1)[1]} elements (the default 1048576)",
                         measured, "", why or "for the default block size"))
    return verdicts


def markdown(verdicts: list[tuple[str, str, str, str]]) -> str:
    lines = ["## Issue 4's goals (`python -m benchmarks.gpu.goals`)", "",
             "| goal | measured | bound | verdict |", "|---|---:|---|---|"]
    lines += [f"| {name} | {measured} | {bound} | {verdict} |" for name, measured, bound, verdict in verdicts]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    paths = [Path(p) for p in (sys.argv[1:] if argv is None else argv)]
    if not paths:
        print("usage: python -m benchmarks.gpu.goals RESULT.json ...", file=sys.stderr)
        return 2
    print(markdown(judge(load(paths))), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
