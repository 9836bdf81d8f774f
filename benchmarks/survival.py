"""The README's "what survives what" table, generated from the fault suite itself (tests/safety).

    python benchmarks/survival.py            # run tests/safety, write benchmarks/results/survival.json, print the table
    python benchmarks/survival.py --readme   # ... and put the table into README.md between its markers
    python benchmarks/survival.py --report FILE   # no run: the table of an earlier RELIEF_SURVIVAL_REPORT file

Every test in tests/safety is marked `@pytest.mark.survives(KIND, WHAT)`; run with
`RELIEF_SURVIVAL_REPORT=FILE`, each appends its kind, what, number of variants (its parametrized
case, or each fault of a chain, or each fuzzed example) and outcome to FILE. A row of the table
is one WHAT: how many variants were tried and how many of its tests passed; nothing is counted by
hand.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "survival.json"
BEGIN, END = "<!-- survival table: python benchmarks/survival.py --readme -->", "<!-- end survival table -->"
INPUTS = ("hostile checkpoint", "hostile data", "absurd sizes", "torn file", "server abuse")
FAULTS = ("kill", "signal", "full disk", "concurrent writer", "torn file", "hostile checkpoint", "hostile data",
          "absurd sizes")


def run_suite(report: Path, pytest_args: list[str]) -> int:
    env = os.environ | {"RELIEF_SURVIVAL_REPORT": str(report), "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "pytest", "tests/safety", "-q", "-p", "no:cacheprovider", *pytest_args]
    return subprocess.run(command, cwd=ROOT, env=env).returncode


def summarize(records: list[dict]) -> dict:
    rows: dict[tuple[str, str], dict] = defaultdict(lambda: {"variants": 0, "tests": 0, "passed": 0})
    for r in records:
        row = rows[r["kind"], r["what"]]
        row["variants"] += r["variants"]
        row["tests"] += 1
        row["passed"] += r["outcome"] == "passed"
    table = [{"kind": kind, "what": what, **row} for (kind, what), row in sorted(rows.items())]
    return {
        "rows": table,
        "hostile_inputs": sum(r["variants"] for r in table if r["kind"] in INPUTS),
        "fuzzed_examples": sum(r["variants"] for r in table if r["kind"] == "fuzzed input"),
        "fault_kinds": sorted({r["kind"] for r in table if r["kind"] in FAULTS}),
        "all_passed": all(r["passed"] == r["tests"] for r in table),
        "tests": sum(r["tests"] for r in table),
    }


def markdown(summary: dict) -> str:
    lines = ["| kind | fault or input tried | variants | result |", "|---|---|---:|---|"]
    for r in summary["rows"]:
        result = "handled" if r["passed"] == r["tests"] else f"**{r['tests'] - r['passed']} of {r['tests']} FAILED**"
        lines.append(f"| {r['kind']} | {r['what']} | {r['variants']:,} | {result} |")
    lines += ["", f"{summary['tests']} tests; {summary['hostile_inputs']:,} distinct hostile inputs, "
                  f"{summary['fuzzed_examples']:,} fuzzed examples, {len(summary['fault_kinds'])} of the "
                  f"{len(FAULTS)} kinds of fault; "
                  + ("all handled (one line, non-zero exit, nothing lost or corrupted)." if summary["all_passed"]
                     else "NOT all handled: see the rows above.")]
    return "\n".join(lines)


def put_in_readme(table: str) -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"README.md has no {BEGIN} ... {END} markers")
    head, rest = text.split(BEGIN, 1)
    readme.write_text(f"{head}{BEGIN}\n{table}\n{END}{rest.split(END, 1)[1]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--readme", action="store_true", help="Write the table into README.md.")
    parser.add_argument("--report", type=Path, help="Summarize this report file instead of running the suite.")
    parser.add_argument("pytest_args", nargs="*", help="Extra pytest arguments (after --).")
    args = parser.parse_args()
    if args.report:
        report, code = args.report, 0
    else:
        report = Path(tempfile.mkdtemp(prefix="survival-")) / "report.jsonl"
        code = run_suite(report, args.pytest_args)
    records = [json.loads(line) for line in report.read_text().splitlines()]
    summary = summarize(records)
    RESULTS.write_text(json.dumps(summary | {"pytest_exit_code": code}, indent=2) + "\n")
    table = markdown(summary)
    print(table)
    if args.readme:
        put_in_readme(table)
    sys.exit(code)


if __name__ == "__main__":
    main()
