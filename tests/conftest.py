from __future__ import annotations

import pytest


@pytest.fixture
def no_fedws_data(monkeypatch):
    """Keep a developer's FEDWS_DATA from leaking into tests."""
    monkeypatch.delenv("FEDWS_DATA", raising=False)


@pytest.fixture(autouse=True)
def own_fedws_cache(monkeypatch, tmp_path_factory):
    """Each test's caches and client state (and those of the processes it starts) in a folder
    of its own, never the user's ~/.cache/fedws."""
    monkeypatch.setenv("FEDWS_CACHE", str(tmp_path_factory.mktemp("fedws-cache")))
