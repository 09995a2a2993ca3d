from __future__ import annotations

import math

import pytest

from server.run_log import _final_domains


def rows(values: dict[str, float], rnd: int = 3) -> list[dict]:
    return [
        {"round": rnd, "domain": d, "test_accuracy": v, "test_loss": 1.0, "scored_by": "global"}
        for d, v in values.items()
    ]


def test_the_domain_mean_is_over_every_domain_or_null():
    full = _final_domains(rows({"a": 0.5, "b": 0.7}))
    assert full["mean_test_accuracy"] == pytest.approx(0.6)
    one_unscored = _final_domains(rows({"a": 0.5, "b": math.nan}))
    assert one_unscored["mean_test_accuracy"] is None
    missing_last_round = _final_domains(rows({"a": 0.5, "b": 0.7}, 2) + rows({"a": 0.6}))
    assert missing_last_round["round"] == 3 and missing_last_round["mean_test_accuracy"] is None
