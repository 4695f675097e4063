"""Where the real data lives: the one function every CLI, benchmark and test uses to find it."""

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    """The shared data folder: `$MEDCLIP_SHARED_DATA` when set, else `<repo>/../shared/data`."""
    configured = os.environ.get("MEDCLIP_SHARED_DATA")
    return Path(configured) if configured else REPO_ROOT.parent / "shared" / "data"
