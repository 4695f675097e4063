"""Shared pytest fixtures: paths to the real data in ``../shared/data`` and tiny model configs."""

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    """The real data folder: ``$MEDCLIP_SHARED_DATA`` or ``<repo>/../shared/data``."""
    return Path(os.environ.get("MEDCLIP_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = shared_data_dir()
    if not path.is_dir():
        pytest.skip(f"real shared data not found at {path} (set MEDCLIP_SHARED_DATA)")
    return path


@pytest.fixture(scope="session")
def covid_cxr_dir(shared_data) -> Path:
    return shared_data / "covid-cxr"


@pytest.fixture(scope="session")
def iu_reports_dir(shared_data) -> Path:
    return shared_data / "iu-xray-reports"


@pytest.fixture(scope="session")
def tokenizer_dir(shared_data) -> Path:
    return shared_data / "bio-clinicalbert-tokenizer"
