"""A JSON file that must hold one object: configuration and checkpoint metadata."""

import json


def read_json_object(path: str, error_type: type[Exception]) -> dict:
    """The JSON object in `path`; ``error_type`` naming the file (and line) when it holds none."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except json.JSONDecodeError as error:
        raise error_type(f"{path}:{error.lineno}: invalid JSON: {error.msg}") from None
    except (UnicodeDecodeError, RecursionError) as error:  # (RecursionError: thousands of nested brackets)
        raise error_type(f"{path}: invalid JSON ({type(error).__name__}: {error})") from None
    if not isinstance(value, dict):
        raise error_type(f"{path}: not a JSON object")
    return value
