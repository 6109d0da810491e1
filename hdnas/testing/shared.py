"""Where the data shared between checkouts lives: ``$HDNAS_SHARED``, else ``../shared`` next to
the repository (benchmark images under ``data/``, released checkpoints under ``pretrained/``).
Tests skip what needs it when it is missing."""
from __future__ import annotations

import os
from pathlib import Path

from hdnas.native_build import ROOT

#: the checkout this package is imported from (an editable install; for an installed wheel a
#: directory without a ../shared, so only $HDNAS_SHARED finds the data)
REPO = ROOT


def shared_dir() -> Path:
    """``$HDNAS_SHARED`` if set (and not empty), else ``<repository>/../shared``."""
    env = os.environ.get("HDNAS_SHARED")
    return Path(env) if env else REPO.parent / "shared"
