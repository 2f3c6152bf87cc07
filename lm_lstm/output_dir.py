"""Writing an output folder whole or not at all (`lm-lstm convert`, `lm-lstm export`)."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path


def _check_output_dir(output_dir: Path, overwrite: bool) -> None:
    if output_dir.exists() and not output_dir.is_dir():
        raise FileExistsError(f"{output_dir}: exists and is a file, not a folder.")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{output_dir}: exists and is not empty; choose another output folder or allow overwriting "
            "(--overwrite_output_dir)."
        )


def _new_folder(parent: Path, prefix: str) -> Path:
    """A new folder of a random name in `parent`, made as `mkdir` makes one (the umask's permissions, and the parent's
    group where it has the setgid bit), not 0700 as `tempfile.mkdtemp` does: it becomes the output folder."""
    for _ in range(100):
        folder = parent / f"{prefix}{secrets.token_hex(6)}.partial"
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue
    raise FileExistsError(f"{parent}: no free name for a temporary folder {prefix}*.partial")


@contextlib.contextmanager
def staged_output_dir(output_dir: Path, overwrite: bool) -> Iterator[Path]:
    """A new temporary folder to write a model folder into, beside `output_dir` (inside it if it exists and its parent
    cannot be written), moved into place when the block ends normally (its files into `output_dir` if that exists:
    empty, or with `overwrite`, when files of the same names are replaced and others kept); removed, with any parent
    folders made for it, when the block raises, so that a failed conversion or export leaves nothing behind.

    Raises `FileExistsError` if `output_dir` is a file, or a non-empty folder without `overwrite`.
    """
    _check_output_dir(output_dir, overwrite)
    target = Path(os.path.abspath(output_dir))
    made = [folder for folder in target.parents if not folder.exists()]  # deepest first
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        staging = _new_folder(target.parent, f".{target.name}.")
    except PermissionError:
        if not target.is_dir():
            raise
        staging = _new_folder(target, ".lm-lstm-output.")
    try:
        yield staging
        if not target.exists():
            staging.rename(target)
        else:
            for entry in staging.iterdir():
                destination = target / entry.name
                if destination.is_dir() and not destination.is_symlink():
                    shutil.rmtree(destination)
                elif destination.exists() or destination.is_symlink():
                    destination.unlink()
                shutil.move(entry, destination)
            staging.rmdir()
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        for folder in made:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if empty
        raise
