"""Text for the terminal: what probe prints that came from a file (paths, class names,
reasons, a cache's or a run's stored values) can not move the cursor, retitle the
window, write to the clipboard or hide itself.

A file name or a hand-edited `<cache>.duplicates.json` may hold ESC sequences (`ESC ]`
operating-system commands, `ESC [` cursor moves), a carriage return that overwrites the
line, or bidirectional overrides that reorder it. `terminal_text` shows each such
character as a visible escape (`\\x1b`, `\\r`, `\\u202e`) instead. Only cli.py prints; it
passes file-derived text through here.
"""

from __future__ import annotations

import os
import re
from typing import Any

__all__ = ["terminal_text"]

# C0 controls, DEL, C1 controls (U+0080-U+009F: a terminal may read U+009B as ESC [),
# the bidirectional embeddings, overrides and isolates, and the line / paragraph
# separators some terminals break lines at
_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069\u2028\u2029]")
_CONTROLS_BUT_NEWLINE = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e"
                                   "\u2066-\u2069\u2028\u2029]")


def _visible(match: re.Match) -> str:
    code = ord(match.group())
    named = {0x09: "\\t", 0x0A: "\\n", 0x0D: "\\r"}
    if code in named:
        return named[code]
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def terminal_text(value: Any, *, newlines: bool = False) -> str:
    """`str(value)` safe to print: control characters (ESC included, so no escape sequence
    survives), bidirectional controls and undecodable bytes of a path (kept by Python as
    lone surrogates) are shown as backslash escapes. Newlines are escaped too unless
    `newlines` is True (for multi-line output such as a table, whose lines probe built;
    a one-line message keeps to one line)."""
    text = str(value)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        try:  # a path's undecodable bytes as \xff, like cache.display
            text = os.fsencode(text).decode("utf-8", "backslashreplace")
        except UnicodeEncodeError:  # a lone surrogate that is no such byte
            text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return (_CONTROLS_BUT_NEWLINE if newlines else _CONTROLS).sub(_visible, text)
