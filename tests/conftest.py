from __future__ import annotations

import pytest


@pytest.fixture
def no_fedws_data(monkeypatch):
    """Keep a developer's FEDWS_DATA from leaking into tests."""
    monkeypatch.delenv("FEDWS_DATA", raising=False)
