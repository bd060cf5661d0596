"""The image files under a folder, symlinked folders included, each real folder entered once.

``predict`` and ``extract --images`` both list folders this way, so a semantic cache made from a
folder has a key for every image ``predict`` finds in it.
"""
from __future__ import annotations

import os
from collections.abc import Collection
from pathlib import Path


def find_images(folder: Path, extensions: Collection[str]) -> list[Path]:
    """Files under ``folder`` whose suffix (lower-cased) is in ``extensions``, sorted, hidden names skipped.

    Symlinked folders are followed; a folder reached a second time (a loop, or a second link to a
    folder already listed) is not entered again, so no image appears twice and a loop ends. Which of
    its paths an aliased folder's images get is the first in sorted order, depth first.
    """
    found: list[Path] = []
    entered: set[tuple[int, int]] = set()
    for top, folders, files in os.walk(folder, followlinks=True):
        try:
            status = os.stat(top)
        except OSError:  # vanished or unreadable since it was listed: nothing to find in it
            folders[:] = []
            continue
        identity = (status.st_dev, status.st_ino)
        if identity in entered:
            folders[:] = []
            continue
        entered.add(identity)
        # in place: os.walk descends into these
        folders[:] = sorted(name for name in folders if not name.startswith("."))
        here = Path(top)
        found += [here / name for name in files
                  if not name.startswith(".") and Path(name).suffix.lower() in extensions and (here / name).is_file()]
    return sorted(found)
