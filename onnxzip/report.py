"""Reports: dataclasses turned into JSON for machines and aligned tables for people.

Non-finite floats (an SNR of +inf for identical outputs) are written to JSON as the strings
"inf", "-inf" and "nan", so every JSON file onnxzip writes is standard JSON.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from onnxzip.errors import InputError


def to_jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, np.dtype):
        return str(obj)
    return obj


def write_json(report: Any, path: str | os.PathLike) -> Path:
    """Writes ``report`` as JSON atomically (temporary file beside the target, then rename)."""
    target = Path(path)
    if target.is_symlink():  # written through, never replaced by a file
        target = target.resolve()
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise InputError(f"{target}: folder '{folder}' does not exist")
    text = json.dumps(to_jsonable(report), indent=2, allow_nan=False) + "\n"
    try:
        fd, tmp = tempfile.mkstemp(prefix=".onnxzip-", suffix=".json", dir=folder)
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write(text)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise InputError(f"{target}: cannot write: {exc.strerror or exc}") from exc
    return target


def fmt_number(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "inf" if value > 0 else ("-inf" if value < 0 else "nan")
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e6):
            return f"{value:.{digits - 1}e}"
        return (
            f"{value:.{digits}g}"
            if abs(value) < 1
            else f"{value:.{digits}f}".rstrip("0").rstrip(".")
        )
    return str(value)


def table(headers: list[str], rows: list[list[Any]]) -> str:
    """An aligned plain-text table; numbers right-aligned."""
    cells = [[fmt_number(c) for c in row] for row in rows]
    widths = [
        max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)
    ]
    numeric = [
        all(isinstance(row[i], (int, float)) or row[i] is None for row in rows)
        for i in range(len(headers))
    ]

    def line(values: list[str]) -> str:
        return "  ".join(
            v.rjust(w) if num else v.ljust(w)
            for v, w, num in zip(values, widths, numeric, strict=True)
        ).rstrip()

    out = [line(headers), line(["-" * w for w in widths])]
    out += [line(r) for r in cells]
    return "\n".join(out)
