"""Files a command is asked to write (`--output`): checked before any work, by writing there, so a
folder that cannot be written is one line and exit 2 up front, not a failure after the work."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from tune_cells.errors import UserInputError


def check_new_file(output: Path, named: str | None = None) -> Path:
    """`output` as an absolute path, if a new file can be written there without replacing anything.
    Folders it needs and a probe file are made, then removed again. `named`: how an error names
    the place (default `--output OUTPUT`; see `default_output_name`)."""
    output = Path(output).expanduser().absolute()
    refuse_existing(output)
    probe_folder(output.parent, output, named)
    return output


def check_output_folder(folder: Path, named: str | None = None) -> Path:
    """`folder` as an absolute path, if files can be written in it: a folder that exists, or one that
    can be made (it is made to probe, then removed again). Not a file, not read-only."""
    folder = Path(folder).expanduser().absolute()
    if folder.exists() and not folder.is_dir():
        raise UserInputError(f"--output {folder}: is a file, not a folder")
    probe_folder(folder, folder, named)
    return folder


def default_output_name(workdir, what: str) -> str:
    """How an error names an output the user did not give, which goes in the working folder: by the
    flag they did give (--workdir) and the one that puts it elsewhere. A read-only working folder (a
    shared store) is fine for the reading commands, so the way round it must be said."""
    return f"--workdir {workdir} ({what} go in it unless --output names another place)"


def probe_folder(folder: Path, output: Path, named: str | None = None) -> None:
    """Exit 2 naming `named` (default `--output OUTPUT`) unless a file can be written in `folder`:
    the folders it needs and a probe file are made, then removed again."""
    named = named or f"--output {output}"
    made = missing_folders(folder)
    existing = made[-1].parent if made else folder
    if not existing.is_dir():
        raise UserInputError(f"{named}: {existing} is not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(dir=folder, prefix=f".{output.name}.", suffix=".probe")
        os.close(handle)
        os.unlink(probe)
    except OSError as exc:
        raise UserInputError(f"{named}: cannot write there ({exc.strerror or type(exc).__name__})") from None
    finally:
        remove_folders(made)


def refuse_existing(path: Path) -> None:
    """Exit 2 where `path` is a folder or anything already there (a file, a link): never replaced."""
    if path.is_dir():
        raise UserInputError(f"--output {path}: is a folder; name a file")
    if path.exists() or path.is_symlink():
        raise UserInputError(f"--output {path}: already exists (not overwritten)")


def missing_folders(folder: Path) -> list[Path]:
    """The folders above a path that do not exist yet, deepest first."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    return missing


def remove_folders(folders: list[Path]) -> None:
    """Folders a command made, deepest first, each only while empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def unique_stems(names: list[str]) -> list[str]:
    """Each input's file stem for the files written from it; numbered (`0003_<stem>`) where two share
    one (`a/x.png` and `b/x.png`, `slide.001` and `slide.002`), so no input's files overwrite another's."""
    stems = [Path(name).stem for name in names]
    return stems if len(set(stems)) == len(stems) else [f"{i:04d}_{stem}" for i, stem in enumerate(stems)]
