"""Files a command is asked to write (`--output`): checked before any work, by writing there, so a
folder that cannot be written is one line and exit 2 up front, not a failure after the work."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tune_cells.errors import UserInputError


def check_new_file(output: Path | str, named: str | None = None) -> Path:
    """`output` as an absolute path, if a new file can be written there without replacing anything.
    Folders it needs and a probe file are made, then removed again. `named`: how an error names
    the place (default `--output OUTPUT`; see `default_output_name`). Given as typed (a str), a
    trailing separator is refused: `exports/new/` means a folder, and a Path would drop the '/'
    and write files named `new` and `new.json` beside it."""
    if str(output).endswith(("/", os.sep)):
        raise UserInputError(f"{named or f'--output {output}'}: ends in '{str(output)[-1]}', so it names a folder; "
                             "name a file in it (folders it needs are made)")
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


MAX_NUMBERED = 1000  # STEM-2 ... STEM-1000: a clock-named default taken that often is a runaway loop


def output_names(given: Path | None, default: Path, folder_suffix: str = "", default_named: str | None = None) -> list[Path]:
    """Where a command's output file may go, checked before any work: `given` (--output) alone, and it
    and the folder STEM<folder_suffix> beside it must be new; else `default` and its numbered
    STEM-2.SUF, STEM-3.SUF, ... not yet taken: a default named by the clock is taken by another
    command of the same second, which is no reason to refuse. `default_named`: how an error names the
    default place (check_new_file's `named`)."""
    if given is not None:
        names = [check_new_file(given)]
    else:
        default = Path(default).expanduser().absolute()
        names = [name for name in numbered(default)
                 if not _taken(name) and not (folder_suffix and _taken(_beside(name, folder_suffix)))]
        if not names:
            raise UserInputError(f"--output {default}: it and {MAX_NUMBERED - 1} numbered names are taken")
        check_new_file(names[0], default_named)
    if folder_suffix and _taken(_beside(names[0], folder_suffix)):
        raise UserInputError(f"{_beside(names[0], folder_suffix)}: already exists (not overwritten)")
    return names


def numbered(default: Path, folder: bool = False) -> list[Path]:
    """`default` and its numbered STEM-2.SUF, ..., STEM-1000.SUF (a `folder`: NAME-2, ..., whole names)."""
    stem, suffix = (default.name, "") if folder else (default.stem, default.suffix)
    return [default] + [default.with_name(f"{stem}-{n}{suffix}") for n in range(2, MAX_NUMBERED + 1)]


def output_folder(given: Path | None, default: Path, default_named: str | None = None):
    """A context giving the folder a command writes its files in: `given` (--output), which may hold
    files already (each new one is checked by the command), or a new folder at `default` (`new_folder`)."""
    return given_folder(check_output_folder(given)) if given is not None else new_folder(default, default_named)


@contextmanager
def given_folder(folder: Path) -> Iterator[Path]:
    """The user's --output folder: the folders the work makes for it go again should it fail before
    writing in them (an explain whose first grid failed left an empty folder)."""
    made = missing_folders(Path(folder))
    try:
        yield folder
    except BaseException:
        remove_folders(made)  # only while empty: files the work wrote stay
        raise


@contextmanager
def new_folder(default: Path, named: str | None = None) -> Iterator[Path]:
    """A folder this command makes for itself: `default` or the first of its numbered NAME-2, NAME-3,
    ... that is not there yet, made exclusively (never an existing one, even one made since the
    check): a default named by the clock is taken by another command of the same second, whose
    files must stay its own. `named`: how an error names the place (see `default_output_name`).
    Should the work inside fail before writing in it, it goes again, with the folders made for it."""
    default = Path(default).expanduser().absolute()
    probe_folder(default.parent, default, named)  # exit 2 before any work where nothing can be written
    made = missing_folders(default.parent)
    default.parent.mkdir(parents=True, exist_ok=True)
    for name in numbered(default, folder=True):
        try:
            name.mkdir()
            break
        except FileExistsError:
            continue
    else:
        remove_folders(made)
        raise UserInputError(f"{named or f'--output {default}'}: it and {MAX_NUMBERED - 1} numbered names are taken")
    try:
        yield name
    except BaseException:
        remove_folders([name, *made])  # only while empty: files the work wrote stay
        raise


@contextmanager
def claimed(names: list[Path], folder_suffix: str = "") -> Iterator[tuple[Path, Path | None]]:
    """The first of `names` made as an empty file of this command's (with `folder_suffix`, also the
    folder STEM<suffix> beside it), each exclusively: a name another command took since the check is
    passed over, so two never share one; none left is exit 2 (nothing is replaced). Should the work
    inside fail, both go again, with what it wrote in them, and the folders made for them."""
    made = missing_folders(names[0].parent)
    names[0].parent.mkdir(parents=True, exist_ok=True)
    for name in names:
        folder = taken = _beside(name, folder_suffix) if folder_suffix else None
        try:
            taken = name
            os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            taken = folder
            if folder is not None:
                folder.mkdir()
            break
        except FileExistsError:
            if taken == folder:
                name.unlink()
    else:
        remove_folders(made)
        raise UserInputError(f"{'--output ' if taken == name else ''}{taken}: already exists (not overwritten)")
    try:
        yield name, folder
    except BaseException:
        name.unlink(missing_ok=True)
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
        remove_folders(made)
        raise


def _beside(name: Path, suffix: str) -> Path:
    return name.with_name(name.stem + suffix)


def _taken(path: Path) -> bool:
    return path.exists() or path.is_symlink()
