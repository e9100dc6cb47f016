"""Process settings read once from the environment (the only place samullm reads env vars)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

_REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True, slots=True)
class Settings:
    """Settings shared by the CLI commands."""

    shared_dir: Path  # folder with docs/ and data/ measured elsewhere (../shared in a checkout)

    @property
    def default_lengths(self) -> Path:
        """The authors' output-length pmfs measured on no_robots."""
        return self.shared_dir / "data" / "output_length_pdfs.json"


def load_settings() -> Settings:
    """Read ``SAMULLM_SHARED_DIR`` (default: ``shared`` beside the checkout)."""
    shared = os.environ.get("SAMULLM_SHARED_DIR")
    return Settings(shared_dir=Path(shared) if shared else _REPO_ROOT.parent / "shared")
