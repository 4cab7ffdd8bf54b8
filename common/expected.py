"""Expected smoke-scale metrics, committed under tests/expected/, and a readable diff against new results.

CI re-runs the smoke scale and compares every run's per-round metrics with the committed values; any change
fails with one line per difference (paper, run, metric, round, expected, got). After an intended change:

    make expected          # rebuilds the smoke results and rewrites tests/expected/<cpu kind>/<paper>.json

Values are kept per CPU kind: torch's instruction set (avx2, avx512, ...) and the CPU model, e.g. avx512-amd_epyc.
The vectorised kernels of each set round float32 sums differently, and within one set oneDNN chooses convolution
kernels and blockings by model, so the same seed gives the same numbers bit for bit only on CPUs of one kind. On a
kind with no folder yet the check fails; `make expected` on such a machine records it.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from common.experiments import is_calibration, known_papers, paper_calibrations, paper_runs
from common.results import REPO, cpu_kind, write_json_atomic

EXPECTED_DIR = REPO / "tests" / "expected"
COMPARED = ("test_accuracy", "test_loss", "train_loss")


def expected_path(paper: str) -> Path:
    """This machine's expected values of `paper`, under its CPU kind's folder."""
    return EXPECTED_DIR / cpu_kind() / f"{paper}.json"


def describe(spec: dict) -> str:
    if is_calibration(spec):
        return f"{spec['calibration']['name']} of [{describe(spec['base'])}]"
    t, p = spec["training"], spec["partition"]
    return (f"{spec['method']['name']} {spec['model']['name']}-{spec['model'].get('norm', '')} "
            f"C={t['client_fraction']} E={t['local_epochs']} α={p.get('alpha', '—')} seed={spec['seed']}")


def collect(paper: str, results_dir: Path) -> dict:
    """Smoke metrics of the paper's runs (from `results_dir`) and calibrations (from calibrations/ beside it)."""
    out = {}
    found = [(rid, spec, results_dir) for rid, spec in paper_runs(paper, "smoke").items()]
    found += [(cid, spec, results_dir.parent / "calibrations") for cid, spec in paper_calibrations(paper, "smoke").items()]
    for rid, spec, folder in sorted(found, key=lambda f: f[0]):
        res = json.loads((folder / f"{rid}.json").read_text())
        out[rid] = {"run": describe(spec), "status": res["status"],
                    **{m: res["metrics"][m] for m in COMPARED}}
    return out


def diff(paper: str, expected: dict, got: dict) -> list[str]:
    lines = []
    for rid in sorted(set(expected) | set(got)):
        if rid not in got:
            lines.append(f"{paper}: run {rid} ({expected[rid]['run']}) expected but no longer part of the smoke grid")
            continue
        if rid not in expected:
            lines.append(f"{paper}: run {rid} ({got[rid]['run']}) is new; no expected values")
            continue
        e, g = expected[rid], got[rid]
        if e["status"] != g["status"]:
            lines.append(f"{paper}: run {rid} ({e['run']}) status: expected {e['status']}, got {g['status']}")
        for m in COMPARED:
            if len(e[m]) != len(g[m]):
                lines.append(f"{paper}: run {rid} ({e['run']}) {m}: expected {len(e[m])} rounds, got {len(g[m])}")
                continue
            for r, (a, b) in enumerate(zip(e[m], g[m]), start=1):
                if a != b:
                    lines.append(f"{paper}: run {rid} ({e['run']}) {m} round {r}: expected {a!r}, got {b!r}")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=["check", "update"])
    ap.add_argument("--results", type=Path, required=True, help="results/runs folder of a smoke-scale build")
    ap.add_argument("--papers", nargs="*", default=None)
    args = ap.parse_args(argv)
    failures = []
    for paper in args.papers or known_papers():
        got = collect(paper, args.results)
        path = expected_path(paper)
        if args.action == "update":
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(path, got)
            print(f"wrote {path} ({len(got)} runs)")
        else:
            failures += diff(paper, json.loads(path.read_text()), got)
    if failures:
        print("\n".join(failures))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
