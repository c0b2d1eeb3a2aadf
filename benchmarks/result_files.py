"""The names of result files: a run never writes over an earlier one's (the README cites committed
files by name)."""

import tempfile
from pathlib import Path


def free_stem(out_dir: Path, stem: str, extensions=("json", "md", "png")) -> str:
    """``stem``, or ``stem-2``, ``stem-3``, ... : the first whose files do not exist in ``out_dir``
    (created here), which is checked writable. Committed runs are cited by name: a second run of the
    day must never overwrite the first. OSError where the folder cannot be made or written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=out_dir, prefix=".write-check-"):
        pass
    chosen, number = stem, 1
    while any((out_dir / f"{chosen}.{ext}").exists() for ext in extensions):
        number += 1
        chosen = f"{stem}-{number}"
    return chosen
