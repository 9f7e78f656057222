"""Finding text that cannot travel: strings holding lone UTF-16 surrogates.

JSON may spell a lone surrogate (``"\\ud800"``) and Python's parser accepts it, but no UTF-8 encoder
does, so such a string fails on whatever side first encodes it. The API refuses it up front with
the field's name, and the simulator refuses it as the real APIs do (their JSON parsers reject it).
"""

from __future__ import annotations

from typing import Any


def first_unencodable(value: Any) -> str | None:
    """The dotted path (``messages.0.content``) of the first string, or key, that cannot be
    encoded as UTF-8; None when there is none. Iterative, so nesting depth costs no recursion."""
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, str):
            if not _encodable(item):
                return path or "body"
        elif isinstance(item, dict):
            for key, child in reversed(list(item.items())):
                child_path = f"{path}.{key}" if path else str(key)
                if isinstance(key, str) and not _encodable(key):
                    return path or "body"
                stack.append((child_path, child))
        elif isinstance(item, list):
            for i in range(len(item) - 1, -1, -1):
                stack.append((f"{path}.{i}" if path else str(i), item[i]))
    return None


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
