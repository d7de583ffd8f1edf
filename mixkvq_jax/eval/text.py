"""Evaluation text: reading a UTF-8 file (``.gz`` read directly) and slicing token windows.

A good long English text that needs no download is Debian's Jargon File::

    apt-get install -y jargon-text      # ~1.7 MB of English prose
    dpkg -L jargon-text                 # -> /usr/share/doc/jargon-text/jargon.txt.gz

`default_text_path` returns that file when it is installed. Its first ~20k characters are
the table of contents; the report takes its evaluation and calibration windows from the
body (token offsets well past the contents, in disjoint slices).
"""

from __future__ import annotations

import gzip
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mixkvq_jax.errors import UserError

JARGON_PATHS = (
    Path("/usr/share/doc/jargon-text/jargon.txt.gz"),
    Path("/usr/share/doc/jargon-text/jargon.txt"),
)
TEXT_HELP = (
    "UTF-8 text file (.gz is read directly). Debian's Jargon File works well: "
    "`apt-get install -y jargon-text` gives /usr/share/doc/jargon-text/jargon.txt.gz "
    "(~1.7 MB of English prose; the default when installed)"
)


def default_text_path() -> Path | None:
    """The Jargon File of the ``jargon-text`` Debian package, if installed."""
    return next((p for p in JARGON_PATHS if p.is_file()), None)


def resolve_text_path(path: str | Path | None) -> Path:
    """``path``, or the Jargon File when ``path`` is None; a one-line error otherwise."""
    if path is None:
        found = default_text_path()
        if found is None:
            raise UserError("no --text given and the Jargon File is not installed; pass --text "
                            "FILE (UTF-8, .gz ok) or `apt-get install -y jargon-text`")
        return found
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"text file {p} does not exist")
    return p


def normalize_whitespace(text: str) -> str:
    """Strip each line, drop rule lines, collapse blank-line runs to one blank line."""
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if not re.fullmatch(r"[═─=\-_*]{3,}", line)]
    out = re.sub(r"\n{3,}", "\n\n", "\n".join(lines))
    return re.sub(r"[ \t]+", " ", out).strip() + "\n"


def read_text(path: str | Path | None, *, normalize: bool = True) -> str:
    """The text of a UTF-8 file (gzip-compressed when it ends in ``.gz`` or starts with
    the gzip magic), whitespace-normalized unless ``normalize`` is False."""
    p = resolve_text_path(path)
    try:
        raw = p.read_bytes()
    except OSError as err:
        raise UserError(f"cannot read text file {p}: {err}") from None
    if p.suffix == ".gz" or raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as err:
            raise UserError(f"text file {p} is not valid gzip: {err}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"text file {p} is not UTF-8 ({err})") from None
    if normalize:
        text = normalize_whitespace(text)
    if not text.strip():
        raise UserError(f"text file {p} is empty")
    return text


def token_window(ids: Sequence[int], n_tokens: int, offset: int = 0,
                 source: str = "text") -> np.ndarray:
    """``n_tokens + 1`` ids starting at ``offset`` (inputs plus the last target), int32.

    Raises `UserError` when the text is too short for the requested context.
    """
    if n_tokens < 2:
        raise UserError(f"need at least 2 tokens of context, got {n_tokens}")
    if offset < 0:
        raise UserError(f"token offset must be >= 0, got {offset}")
    need = offset + n_tokens + 1
    if len(ids) < need:
        raise UserError(
            f"{source} has {len(ids)} tokens, shorter than the requested context: offset "
            f"{offset} + {n_tokens} tokens + 1 target = {need}; use a longer text, fewer "
            "tokens or a smaller offset"
        )
    return np.asarray(ids[offset:need], np.int32)


def tokenize(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens (windows start mid-text: no BOS).
    ``tokenizer``: an object with ``encode(text, add_special_tokens=False)`` or a
    callable text -> ids."""
    encode: Callable[..., list[int]] = getattr(tokenizer, "encode", tokenizer)
    try:
        return list(encode(text, add_special_tokens=False))
    except TypeError:  # a plain callable / tokenizer without the keyword
        return list(encode(text))
