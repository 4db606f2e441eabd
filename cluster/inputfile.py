"""A user's input file (a saved report, bench run or drain, a guest file, a fleet scenario):
read with its size bounded, parsed as JSON or TOML, and any problem one ConfigError line that
names the file. What it must hold is its reader's to check."""

import json
import tomllib
from pathlib import Path
from typing import Any

from nodes.errors import ConfigError
from nodes.units import format_bytes

MAX_INPUT_BYTES = 64 * 1024 * 1024


def read_text(path: str | Path, what: str, max_bytes: int = MAX_INPUT_BYTES,
              label: str | None = None) -> str:
    """The file's text; `what` names what it should be ("a guest file"), `label` how the
    error names it (default its path)."""
    label = label or str(path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(max_bytes + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read {label}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{label} is not text: {exc}") from None
    if len(text) > max_bytes:
        raise ConfigError(f"{label} is over {format_bytes(max_bytes)}; is it {what}?")
    return text


def read_json(path: str | Path, what: str, max_bytes: int = MAX_INPUT_BYTES,
              label: str | None = None) -> Any:
    label = label or str(path)
    text = read_text(path, what, max_bytes, label)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{label} is not JSON: {exc}") from None


def read_toml(path: str | Path, what: str, max_bytes: int = MAX_INPUT_BYTES,
              label: str | None = None) -> dict:
    label = label or str(path)
    text = read_text(path, what, max_bytes, label)
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{label} is not TOML: {exc}") from None
