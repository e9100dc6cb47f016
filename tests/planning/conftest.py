"""Shared fixtures of the planner tests: the shipped A100 profiles and the authors' length pdfs."""

from __future__ import annotations

import pytest

from coordinator.settings import load_settings
from planning.io.lengths import AuthorsPdfs, load_authors_pdfs
from planning.io.profiles import load_default_profiles
from planning.profile import ProfileSet

PDFS = load_settings().shared_dir / "data" / "output_length_pdfs.json"


@pytest.fixture(scope="session")
def profiles() -> ProfileSet:
    return load_default_profiles()


@pytest.fixture(scope="session")
def pdfs() -> AuthorsPdfs:
    return load_authors_pdfs(PDFS)
