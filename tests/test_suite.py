"""The benchmark suite (benchmarks/bench_suite.py) end to end on its smallest sets."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

from _datasets import DATASETS  # noqa: E402

pytest.importorskip("scvi", reason="the suite's scVI baseline needs scvi-tools (test extra)")
import bench_suite  # noqa: E402

# The smallest set of each kind in the quick tier.
SMALLEST = ("sortseq", "mesc")


@pytest.mark.skipif(
    not all(DATASETS[n].available() for n in SMALLEST),
    reason="the suite's data sets live in ../shared/data (only on developer machines/CI)",
)
def test_quick_tier_smallest_sets_have_every_model_and_baseline(tmp_path, capsys):
    assert set(SMALLEST) <= set(bench_suite.TIERS["quick"]["sets"])
    rows = bench_suite.main(
        [
            "--tier",
            "quick",
            "--sets",
            *SMALLEST,
            "--smoke-epochs",
            "2",
            "--jobs",
            "1",
            "--output",
            str(tmp_path / "suite.md"),
        ]
    )
    report = (tmp_path / "suite.md").read_text()
    assert report in capsys.readouterr().out  # printed, and written to --output
    for name in SMALLEST:
        kind = DATASETS[name].kind
        expected = bench_suite.methods(kind, bench_suite.TIERS["quick"]["likelihoods"], 6)
        got = rows[rows["set"] == name]
        assert set(got["method"]) == {m.name for m in expected}
        for method in expected:
            seeds = got.loc[got["method"] == method.name, "seed"]
            assert sorted(seeds) == (list(bench_suite.SEEDS) if method.seeded else [0])
            # Every row of the set's table, and a finite score in it.
            assert f"| {method.name} | " in report
        scores = bench_suite.SINGLE_METRICS if kind == "single" else ("total", "bio_conservation")
        values = got[list(scores)].to_numpy()
        assert np.isfinite(values).all() and (values >= 0).all() and (values <= 1).all()
    # One summary line per model of ours, for each kind of set.
    summary = report.split("### Summary", 1)[1]
    for tool in bench_suite.TOOLS:
        assert f"| sv.tl.{tool} | " in summary
        for lik in bench_suite.TIERS["quick"]["likelihoods"]:
            assert f"| sv.tl.{tool}, {lik} | " in summary
