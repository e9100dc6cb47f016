"""Fixtures shared by the application-file tests: the shipped A100 profiles and the authors'
output-length pdfs (skipped when the shared data is absent)."""

from __future__ import annotations

import pytest

from coordinator.settings import load_settings
from planning.io.lengths import AuthorsPdfs, load_authors_pdfs
from planning.io.profiles import load_default_profiles
from planning.profile import ProfileSet


@pytest.fixture(scope="module")
def profiles() -> ProfileSet:
    return load_default_profiles()


@pytest.fixture(scope="module")
def pdfs() -> AuthorsPdfs:
    path = load_settings().default_lengths
    if not path.is_file():
        pytest.skip(f"shared data absent: {path}")
    return load_authors_pdfs(path)
