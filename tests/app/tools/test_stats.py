"""The report's statistics against values computed by hand on a small fixed results table."""

from __future__ import annotations

import math

import pytest
from helpers import small_config

from app.tools.stats import mean_ci, paired, t_975
from app.tools.study_report import (
    CellResult,
    _final,
    _paired_section,
    accuracy_table,
    domain_table,
    paired_table,
)


@pytest.mark.parametrize(
    ("df", "t"), [(1, 12.706), (2, 4.303), (4, 2.776), (30, 2.042), (40, 2.021), (120, 1.980)]
)
def test_t_quantiles_match_the_table(df, t):
    assert t_975(df) == pytest.approx(t, abs=1e-3)


def test_mean_and_ci_by_hand():
    ci = mean_ci([0.80, 0.82, 0.84])
    # mean 0.82, sample std 0.02, half-width t(2) * 0.02 / sqrt(3) = 4.303 * 0.011547
    assert ci.mean == pytest.approx(0.82)
    assert ci.half_width == pytest.approx(4.303 * 0.02 / math.sqrt(3))
    assert ci.text() == "0.8200 ± 0.0497"
    single = mean_ci([0.7])
    assert single.half_width is None and single.text() == "0.7000 (n=1, no CI)"


def test_paired_differences_by_hand():
    result = paired({0: 0.80, 1: 0.70, 2: 0.90, 3: 0.5}, {0: 0.75, 1: 0.72, 2: 0.80})
    # seed 3 has no baseline: diffs 0.05, -0.02, 0.10 -> mean 0.0433, std 0.0603
    diffs = [0.05, -0.02, 0.10]
    mean = sum(diffs) / 3
    std = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 2)
    assert result.interval.mean == pytest.approx(mean)
    assert result.interval.half_width == pytest.approx(4.303 * std / math.sqrt(3))
    assert (
        result.wins == 2 and result.text() == f"+{mean:.4f} ± {4.303 * std / 3**0.5:.4f}, won 2/3"
    )
    assert paired({0: 0.5}, {1: 0.4}) is None


def cell(norm: str, strategy: str, column: str, seed: int, final: float) -> CellResult:
    cfg = small_config(f"model.norm={norm}", f"federation.strategy={strategy}", f"seed={seed}")
    row = norm if strategy == "fedavg" else f"{norm}, {strategy}"
    summary = {"status": "completed", "final": {"test_accuracy": final}}
    return CellResult(f"{row}-{column}-{seed}", {}, cfg, summary, [], [], row, column)


RESULTS = [  # a small fixed results table: 2 partitions x 3 rows x 3 seeds (one missing)
    *(cell("bn", "fedavg", "iid", s, v) for s, v in enumerate([0.80, 0.82, 0.84])),
    *(cell("bn", "fedavg", "Dir(0.1)", s, v) for s, v in enumerate([0.60, 0.64, 0.62])),
    *(cell("ws_gn", "fedavg", "iid", s, v) for s, v in enumerate([0.81, 0.81, 0.87])),
    *(cell("ws_gn", "fedavg", "Dir(0.1)", s, v) for s, v in enumerate([0.70, 0.71, 0.69])),
    *(cell("bn", "fedbn", "iid", s, v) for s, v in enumerate([0.10, 0.11])),
    *(cell("bn", "fedbn", "Dir(0.1)", s, v) for s, v in enumerate([0.10, 0.12, 0.11])),
]


def test_accuracy_table_shows_mean_and_ci_over_seeds():
    table = accuracy_table(RESULTS).splitlines()
    assert table[0] == "| | iid | Dir(0.1) |"
    # bn iid: 0.82 ± 4.303*0.02/sqrt(3) = 0.0497; ws_gn iid: mean 0.83, std 0.034641 -> 0.0861
    assert table[2] == "| bn | 0.8200 ± 0.0497 | 0.6200 ± 0.0497 |"
    assert table[3] == "| ws_gn | **0.8300 ± 0.0861** | **0.7000 ± 0.0248** |"
    # two seeds: t(1) = 12.706, std 0.007071 -> 0.0635, marked since n is below 3
    few = "(n=2: too few seeds, wide interval)"
    assert table[4] == f"| bn, fedbn | 0.1050 ± 0.0635 {few} | 0.1100 ± 0.0248 |"


def test_paired_table_against_bn_fedavg_by_hand():
    table = paired_table(RESULTS).splitlines()
    assert table[0] == "| minus bn | iid | Dir(0.1) |"
    # ws_gn - bn, iid: diffs 0.01, -0.01, 0.03: mean 0.01, std 0.02 -> ± 0.0497, won 2/3
    # Dir(0.1): diffs 0.10, 0.07, 0.07: mean 0.08, std 0.017321 -> ± 0.0430, won 3/3
    assert table[2] == "| ws_gn | +0.0100 ± 0.0497, won 2/3 | +0.0800 ± 0.0430, won 3/3 |"
    # fedbn - bn, iid: seeds 0 and 1 only: diffs -0.70, -0.71 -> ± 12.706 * 0.005 = 0.0635
    assert table[3].startswith(
        "| bn, fedbn | -0.7050 ± 0.0635, won 0/2 (too few seeds, wide interval) | "
    )


def domain_cell(norm: str, strategy: str, seed: int, accs: dict[str, float]) -> CellResult:
    c = cell(norm, strategy, "domains", seed, 0.5)
    c.summary["domains"] = {"test_accuracy": accs}
    return c


def test_domain_table_and_its_paired_differences_by_hand():
    cells = [
        domain_cell("bn", "fedavg", 0, {"mnist": 0.90, "svhn": 0.50}),
        domain_cell("bn", "fedavg", 1, {"mnist": 0.92, "svhn": 0.54}),
        domain_cell("nf", "fedavg", 0, {"mnist": 0.91, "svhn": 0.60}),
        domain_cell("nf", "fedavg", 1, {"mnist": 0.89, "svhn": 0.62}),
    ]
    table = domain_table(cells).splitlines()
    assert table[0] == "| | mnist | svhn | mean |"
    # bn mean per seed: 0.70, 0.73 -> 0.715 ± 12.706 * 0.021213 / sqrt(2) = 0.1906
    # two seeds each: every interval marked, nothing bolded
    few = "(n=2: too few seeds, wide interval)"
    assert (
        table[2]
        == f"| bn | 0.9100 ± 0.1271 {few} | 0.5200 ± 0.2541 {few} | 0.7150 ± 0.1906 {few} |"
    )
    # nf: mnist 0.90 ± 0.1271; svhn 0.61 ± 0.1271; mean per seed 0.755, 0.755 -> ± 0
    assert (
        table[3]
        == f"| nf | 0.9000 ± 0.1271 {few} | 0.6100 ± 0.1271 {few} | 0.7550 ± 0.0000 {few} |"
    )
    paired = paired_table(cells, domains=True).splitlines()
    # mean diffs per seed: 0.055, 0.025 -> 0.04 ± 12.706 * 0.021213 / sqrt(2) = 0.1906
    assert paired[2].endswith("| +0.0400 ± 0.1906, won 2/2 (too few seeds, wide interval) |")


def test_a_diverged_seed_is_left_out_of_the_pairs_and_said_so():
    lost = cell("ws_gn", "fedavg", "iid", 2, 0.0)
    lost.summary = {"status": "diverged", "diverged_round": 4}
    cells = [c for c in RESULTS if c.id != "ws_gn-iid-2"] + [lost]
    table = paired_table(cells).splitlines()
    # ws_gn - bn, iid on seeds 0 and 1: diffs 0.01, -0.01 -> 0.00 ± 12.706 * 0.014142 / sqrt(2)
    assert table[2].startswith(
        "| ws_gn | +0.0000 ± 0.1271, won 1/2 (too few seeds, wide interval) "
        "(1 diverged seed(s) left out)"
    )


def test_a_baseline_naming_no_row_is_said_not_silently_skipped():
    assert paired_table(RESULTS, baseline="bn, fedavg") is None
    note = _paired_section(RESULTS, _final, "x", baseline="bn, fedavg")
    assert note[0].startswith("(No paired comparison: the study's baseline `bn, fedavg` names no")
    assert "`ws_gn`" in note[0]
