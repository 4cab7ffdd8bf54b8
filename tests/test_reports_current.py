"""Committed reports must match their paper.yaml: a stale report cannot be cited by accident.

Each report lists the run ids (hashes of the resolved configs) it was built from; they must equal the runs
that paper.yaml asks for at the report's scale. After changing a paper.yaml, rebuild its report.
"""
import re
from pathlib import Path

import pytest

from common.experiments import known_papers, paper_runs

REPORTS = Path(__file__).resolve().parent.parent / "reports"


def committed_reports():
    return sorted(p.stem for p in REPORTS.glob("*.md") if p.name != "README.md")


def test_every_committed_report_belongs_to_a_paper():
    assert set(committed_reports()) <= set(known_papers())


@pytest.mark.parametrize("paper", committed_reports())
def test_committed_report_is_current(paper):
    text = (REPORTS / f"{paper}.md").read_text()
    scale = re.search(r"\*\*Scale: `(\w+)`\*\*", text).group(1)
    runs_table = text.split("Runs used by this report")[1].split("</details>")[0]
    used = set(re.findall(r"^\| `([0-9a-f]{12})` \|", runs_table, flags=re.M))
    expected = set(paper_runs(paper, scale))
    assert used == expected, (f"reports/{paper}.md is stale: rebuild it with `snakemake -c 2 reports/{paper}.md` "
                              f"({len(expected - used)} runs missing, {len(used - expected)} no longer used)")
    for fig in re.findall(r"\]\((figures/[^)]+)\)", text):
        assert (REPORTS / fig).is_file(), f"reports/{paper}.md shows {fig}, which is not committed"
