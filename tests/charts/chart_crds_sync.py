"""Keep the chart's CRD copies equal to `operators/crds/*.yaml`.

Helm reads only files inside the chart directory, so the chart carries copies under
`charts/cityplane/files/crds/`. `test_chart_crds.py` fails when they drift; this refreshes them:

    .venv/bin/python -m tests.charts.chart_crds_sync
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "operators" / "crds"
CHART_COPIES = ROOT / "charts" / "cityplane" / "files" / "crds"


def drift() -> list[str]:
    """What differs between the chart's copies and the operator's CRDs (empty: in sync)."""
    sources = {p.name: p for p in SOURCE.glob("*.yaml")}
    copies = {p.name: p for p in CHART_COPIES.glob("*.yaml")}
    problems = [
        f"{name}: missing from the chart" for name in sorted(sources.keys() - copies.keys())
    ]
    problems += [
        f"{name}: no longer in operators/crds" for name in sorted(copies.keys() - sources.keys())
    ]
    problems += [
        f"{name}: differs from operators/crds/{name}"
        for name in sorted(sources.keys() & copies.keys())
        if sources[name].read_bytes() != copies[name].read_bytes()
    ]
    return problems


def sync() -> list[str]:
    """Copy every operator CRD into the chart and drop stale copies; returns what changed."""
    changed = drift()
    CHART_COPIES.mkdir(parents=True, exist_ok=True)
    for stale in CHART_COPIES.glob("*.yaml"):
        if not (SOURCE / stale.name).exists():
            stale.unlink()
    for source in SOURCE.glob("*.yaml"):
        shutil.copyfile(source, CHART_COPIES / source.name)
    return changed


if __name__ == "__main__":
    for line in sync() or ["in sync"]:
        print(line, file=sys.stderr)
