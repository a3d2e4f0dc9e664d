"""Result base class, report documents (schema) and atomic file writes.

Every result dataclass derives from :class:`Result`: ``to_dict()`` gives plain JSON-able data, and item access
(``result["impact_score"]``) works as well as attribute access, which is how the seed's examples read results.

Files are written atomically: the content goes to a temporary file in the target directory, which is renamed over
the target only once it is complete. On any error the temporary file is removed, so no partial file remains.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import io
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Union

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


def atomic_write(path: Union[str, Path], write: Callable[[io.TextIOBase], None]) -> Path:
    """Write a text file atomically through ``write(fileobj)``; on error nothing is left behind."""
    path = Path(path)
    if path.exists() and path.is_dir():
        raise ValueError(f"{path} is a directory; give a file path.")
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise ValueError(f"directory {directory} does not exist; create it first.")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: Union[str, Path], document: Any) -> Path:
    text = json.dumps(to_jsonable(document), indent=2, allow_nan=False)
    return atomic_write(path, lambda fh: fh.write(text))


def write_csv(path: Union[str, Path], table: pd.DataFrame) -> Path:
    text = table.to_csv(index=False)
    return atomic_write(path, lambda fh: fh.write(text))
