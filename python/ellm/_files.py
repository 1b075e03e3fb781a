"""Reading the small JSON files ellm is given (configs, partition plans), with errors that name the file."""

from __future__ import annotations

import json
import os


def read_json_object(path: str | os.PathLike, what: str) -> dict:
    """The JSON object in `path`: FileNotFoundError naming `what` where there is no file, ValueError
    where it is not JSON or not an object."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {what} at {path}")
    with open(path, encoding="utf-8") as fh:
        try:
            value = json.load(fh)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} must hold a JSON object ({what})")
    return value
