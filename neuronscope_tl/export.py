"""Result base class, report documents (schema) and atomic file writes.

Every result dataclass derives from :class:`Result`: ``to_dict()`` gives plain JSON-able data, and item access
(``result["impact_score"]``) works as well as attribute access, which is how NeuronScope-style code reads results.

Files are written atomically: the content goes to a temporary file in the target directory, which is renamed over
the target only once it is complete. On any error the temporary file is removed, so no partial file remains.
A set of files that belong together (a JSON document and its CSV tables) is written by :func:`write_set`: all of
them are replaced, or none.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import io
import json
import math
import os
import secrets
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Union

import numpy as np
import pandas as pd
import torch

SCHEMA_VERSION = "1.0"


def to_jsonable(obj: Any) -> Any:
    """Convert results to JSON-able data; NaN and infinities become None (strict JSON)."""
    if isinstance(obj, Result):
        return obj.to_dict()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, pd.DataFrame):
        return [to_jsonable(r) for r in obj.to_dict(orient="records")]
    if isinstance(obj, pd.Series):
        return to_jsonable(obj.to_dict())
    if isinstance(obj, torch.Tensor):
        return to_jsonable(obj.detach().cpu().tolist())
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        value = float(obj)
        return value if math.isfinite(value) else None
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj


class Result:
    """Mixin for result dataclasses: ``to_dict()`` and mapping-style access."""

    def to_dict(self) -> Dict[str, Any]:
        return {f.name: to_jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def __getitem__(self, key: str) -> Any:
        if key in self._keys():
            return getattr(self, key)
        raise KeyError(key)

    def __contains__(self, key: object) -> bool:
        return key in self._keys()

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key) if key in self._keys() else default

    def keys(self):
        return list(self._keys())

    def _keys(self):
        names = [f.name for f in dataclasses.fields(self)]
        return names + [n for n in getattr(self, "_extra_keys", ())]


def utc_timestamp() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def report_document(kind: str, model_name: str, settings: dict, texts: Optional[dict], result: Any) -> dict:
    """The JSON document every export writes (and the REST export returns).

    Keys: ``schema_version``, ``kind`` (``weight_analysis``, ``impact_analysis``, ...), ``model``, ``settings``,
    ``texts`` (number of texts and tokens, or None for weight-only analyses), ``created`` (UTC ISO time),
    ``result``.
    """
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": kind,
        "model": model_name,
        "settings": to_jsonable(settings),
        "texts": to_jsonable(texts),
        "created": utc_timestamp(),
        "result": to_jsonable(result),
    }


def _check_target(path: Union[str, Path]) -> Path:
    """A writable file path: not a directory, in an existing directory. Raises ValueError otherwise."""
    path = Path(path)
    if path.exists() and path.is_dir():
        raise ValueError(f"{path} is a directory; give a file path.")
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise ValueError(f"directory {directory} does not exist; create it first.")
    return path


def _write_temp(path: Path, write: Callable[[io.TextIOBase], None]) -> str:
    """Write a complete, fsynced temporary file beside ``path`` and return its name; on error remove it."""
    directory = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())
    except BaseException:
        _remove(tmp)
        raise
    return tmp


def _remove(name: Union[str, Path]) -> None:
    try:
        os.unlink(name)
    except FileNotFoundError:
        pass


def atomic_write(path: Union[str, Path], write: Callable[[io.TextIOBase], None]) -> Path:
    """Write a text file atomically through ``write(fileobj)``; on error nothing is left behind."""
    path = _check_target(path)
    tmp = _write_temp(path, write)
    try:
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
    return path


@contextmanager
def atomic_directory(out: Union[str, Path]) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``out``; when the body finishes, it replaces ``out`` whole. If the
    body raises, the temporary directory is removed and ``out`` is left as it was."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        normal_permissions(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def normal_permissions(directory: Union[str, Path]) -> None:
    """Give a directory tree the permissions a user's new files get (0777 / 0666 minus the umask): ``mkdtemp``
    and writers that go through ``mkstemp`` (safetensors via transformers, for one) create 0700 / 0600."""
    mask = current_umask()
    os.chmod(directory, 0o777 & ~mask)
    for path in Path(directory).rglob("*"):
        if not path.is_symlink():
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def json_text(document: Any) -> str:
    """Strict JSON (NaN and infinities as null) of a result or document, indented."""
    return json.dumps(to_jsonable(document), indent=2, allow_nan=False)


def csv_text(table: pd.DataFrame) -> str:
    return table.to_csv(index=False)


def write_json(path: Union[str, Path], document: Any) -> Path:
    text = json_text(document)
    return atomic_write(path, lambda fh: fh.write(text))


def write_csv(path: Union[str, Path], table: pd.DataFrame) -> Path:
    text = csv_text(table)
    return atomic_write(path, lambda fh: fh.write(text))


def _backup(path: Path) -> Path:
    """A hidden copy of ``path`` beside it (a hard link where the file system allows; else a copy)."""
    while True:
        backup = path.with_name(f".{path.name}.{secrets.token_hex(6)}.bak")
        try:
            os.link(path, backup)
            return backup
        except FileExistsError:
            continue
        except OSError:
            if backup.exists():
                continue
            shutil.copy2(path, backup)
            return backup


def write_set(files: Dict[Union[str, Path], Any]) -> List[Path]:
    """Write several files as one unit: afterwards either every file holds its new content, or (on any error)
    every file is as it was before the call.

    Args:
        files: {path: content}. A pandas DataFrame is written as CSV without its index; anything else as strict
            JSON (:func:`to_jsonable`; NaN and infinities become null), as :func:`write_csv` / :func:`write_json` do.

    Returns the paths, in the order given.

    1. Every path is checked (no directory, the directory exists, no path twice) and every content is rendered
       before anything touches the disk: a bad path is a ``ValueError``, unserialisable content a ``TypeError``.
    2. Every file is written completely to a temporary file in its own directory (fsynced). If any write fails,
       all temporary files are removed and the error is raised: previous files are untouched.
    3. Existing targets get a hidden backup (a hard link, so a target is never missing), then each temporary file
       is renamed over its target. If a rename fails, the targets already replaced are restored from their
       backups (targets that did not exist are removed again), so no mix of new and old files remains; then the
       error is raised. On success the backups are removed.
    """
    targets = [_check_target(p) for p in files]
    seen: Dict[Path, Path] = {}
    for path in targets:
        key = path.resolve()
        if key in seen:
            raise ValueError(f"{path} is given twice (also as {seen[key]}); each file of a set may be written once.")
        seen[key] = path
    texts = [csv_text(v) if isinstance(v, pd.DataFrame) else json_text(v) for v in files.values()]
    temps: List[str] = []
    backups: Dict[Path, Path] = {}
    try:
        for path, text in zip(targets, texts):
            temps.append(_write_temp(path, lambda fh, text=text: fh.write(text)))
        for path in targets:
            if path.exists():
                backups[path] = _backup(path)
        for path, tmp in zip(targets, temps):
            os.replace(tmp, path)
    except BaseException as exc:
        # A complete temporary file that is gone was renamed over its target (also when an interrupt landed
        # right after the rename); a rename that raised replaced nothing.
        replaced = [path for path, tmp in zip(targets, temps) if not os.path.lexists(tmp)]
        for tmp in temps:
            _remove(tmp)
        failed: Dict[Path, str] = {}
        for path in reversed(replaced):
            backup = backups.get(path)
            try:
                if backup is not None:
                    os.replace(backup, path)
                    _remove(backup)  # rename onto another link of the same file leaves both names
                    del backups[path]
                else:
                    _remove(path)
            except OSError as undo_exc:  # keep the backup for the user and say where it is
                failed[path] = f"{path} (previous content kept in {backup}: {undo_exc})"
        for path, backup in backups.items():
            if path not in failed:
                _remove(backup)
        if failed:
            raise OSError(f"writing the file set failed ({exc}) and restoring failed for {'; '.join(failed.values())}") from exc
        raise
    for backup in backups.values():
        _remove(backup)
    return targets
