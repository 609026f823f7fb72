"""Shared fixtures for the unit tests (no root, no kernel)."""

from __future__ import annotations

from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture
def fixtures_dir() -> Path:
    return FIXTURES


@pytest.fixture
def cluster_list() -> Path:
    """`kubectl get svc,endpointslices -A -o yaml` of a small cluster."""
    return FIXTURES / "cluster-list.yaml"


@pytest.fixture
def cluster_multidoc() -> Path:
    """The same objects as cluster_list, one YAML document each."""
    return FIXTURES / "cluster-multidoc.yaml"
