"""The study report's tables from hand-made cell results: what is bolded, what is left out and
what the intervals are said to cover."""

from __future__ import annotations

import dataclasses

from helpers import small_config

from app.tools.study_report import (
    CellResult,
    accuracy_table,
    domain_table,
    global_cells,
    interval_coverage,
    paired_table,
)


def cell(row: str, column: str, seed: int, acc: float | None, **kw) -> CellResult:
    cfg = small_config(f"seed={seed}", *kw.pop("sets", ()))
    status = kw.pop("status", "completed")
    summary = {"status": status, "final": None if acc is None else {"test_accuracy": acc}}
    if status == "diverged":
        summary["diverged_round"] = 2
    summary.update(kw.pop("summary", {}))
    return CellResult(f"{row}-{column}-{seed}", {}, cfg, summary, [], [], row, column)


def table_row(table: str, row: str) -> list[str]:
    line = next(line for line in table.splitlines() if line.startswith(f"| {row} |"))
    return [c.strip() for c in line.strip("|").split("|")][1:]


def test_the_best_mean_is_bold_only_over_three_seeds_and_never_on_a_tie():
    three = [cell("a", "iid", s, 0.8 + s / 100) for s in range(3)]
    three += [cell("b", "iid", s, 0.7) for s in range(3)]
    assert table_row(accuracy_table(three), "a")[0].startswith("**0.8100")
    assert not table_row(accuracy_table(three), "b")[0].startswith("**")

    two = [c for c in three if c.config.seed < 2]
    row_a = table_row(accuracy_table(two), "a")[0]
    assert not row_a.startswith("**") and "n=2: too few seeds" in row_a

    tie = [cell(r, "iid", s, 0.8) for r in ("a", "b") for s in range(3)]
    assert not any("**" in c for r in ("a", "b") for c in table_row(accuracy_table(tie), r))


def test_a_higher_mean_on_too_few_seeds_or_a_printed_tie_leaves_the_column_unbolded():
    cells = [cell("a", "iid", s, 0.905) for s in range(2)]  # higher, but only 2 seeds
    cells += [cell("b", "iid", s, 0.81 + s / 1000) for s in range(3)]
    assert "**" not in accuracy_table(cells)  # b is not the best shown: not bolded either
    tie = [cell("a", "iid", s, 0.81001) for s in range(3)]
    tie += [cell("b", "iid", s, 0.81004) for s in range(3)]  # both print as 0.8100
    assert "**" not in accuracy_table(tie)


def test_paired_differences_with_two_seeds_carry_the_note():
    cells = [cell("bn", "iid", s, 0.7) for s in range(2)]
    cells += [cell("ws", "iid", s, 0.8 + s / 100) for s in range(2)]
    assert "too few seeds" in paired_table(cells, baseline="bn")


def test_a_domain_table_counts_diverged_seeds_and_never_bolds_them():
    def dom(row: str, seed: int, accs, status="completed"):
        summary = {"domains": {"test_accuracy": accs}} if accs else {}
        return cell(row, "domains", seed, 0.5, status=status, summary=summary)

    cells = [dom("a", s, {"x": 0.9, "y": 0.9}) for s in range(2)] + [dom("a", 2, None, "diverged")]
    cells += [dom("b", s, {"x": 0.6, "y": 0.6}) for s in range(3)]
    table = domain_table(cells)
    row_a, row_b = table_row(table, "a"), table_row(table, "b")
    assert all("diverged (r2)" in c and "**" not in c for c in row_a)
    assert not any("**" in c for c in row_b)  # a shows more and lost a seed: nobody is bold


def test_fedbns_server_model_is_left_out_of_the_global_tables():
    fedbn = ("model.norm=bn", "federation.strategy=fedbn")
    cells = [cell("bn, fedavg", "iid", s, 0.7, sets=("model.norm=bn",)) for s in range(3)]
    cells += [cell("bn, fedbn", "iid", s, 0.2, sets=fedbn) for s in range(3)]
    fixbn = ("model.norm=fixbn", "federation.strategy=fedbn")
    cells += [cell("fixbn, fedbn", "iid", s, 0.2, sets=fixbn) for s in range(3)]
    kept = global_cells(cells)
    assert {c.row for c in kept} == {"bn, fedavg"}
    assert "fedbn" not in accuracy_table(kept) and "fedbn" not in paired_table(kept)


def test_the_report_says_what_the_intervals_cover():
    drawn = [cell("a", "iid", s, 0.5) for s in range(3)]
    text = interval_coverage(drawn)
    assert (
        "seeds 0-2: each seed draws the partition, the initialisation and the batch order" in text
    )
    sampled = [cell("a", "iid", s, 0.5, sets=("federation.fraction_train=0.5",)) for s in (0, 1)]
    assert "and which clients take part each round" in interval_coverage(sampled)
    subset = [cell("a", "iid", s, 0.5, sets=("data.test_samples=50",)) for s in (0, 1)]
    assert "the test subset" in interval_coverage(subset)
    pinned = [cell("a", "iid", s, 0.5, sets=("data.partition.seed=7",)) for s in range(3)]
    text = interval_coverage(pinned)
    assert "pinned to seed 7" in text and "training noise only" in text
    mixed = [dataclasses.replace(drawn[0]), pinned[1]]
    assert "see each run's config.yaml" in interval_coverage(mixed)
