"""The one exception type users see: its message is a single line naming the file and field."""
import reprlib


class JdnasError(Exception):
    """A user-facing error (bad params, bad data, missing input). The CLI prints it and exits 2."""


class ConfigError(JdnasError):
    """Invalid params: unknown key, wrong type or out-of-range value."""


class DataError(JdnasError):
    """Invalid dataset: missing file, bad JSON, dangling id, bad box, unreadable image..."""


MAX_VALUE_CHARS = 200


def short(value: object, limit: int = MAX_VALUE_CHARS) -> str:
    """`repr(value)` for an error line, at most `limit` characters: a huge or deeply nested value (a
    YAML alias bomb, a list nested thousands deep) is shortened without being expanded in full."""
    r = reprlib.Repr()
    r.maxlevel, r.maxlist, r.maxdict, r.maxtuple, r.maxset = 4, 8, 8, 8, 8
    r.maxstring, r.maxother, r.maxlong = limit, limit, 60
    try:
        text = r.repr(value)
    except Exception:  # noqa: BLE001 - a value whose repr fails (RecursionError...): say what it is
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 20] + f"... ({len(text)} chars)"


def shorten_line(text: str, limit: int = 2000) -> str:
    """One line: newlines folded, the middle of an over-long message cut."""
    text = " ".join(str(text).split("\n"))
    return text if len(text) <= limit else f"{text[: limit // 2]} ... {text[-limit // 4:]}"


def clip(text: str, limit: int = MAX_VALUE_CHARS) -> str:
    """A plain string cut to about `limit` characters."""
    text = str(text)
    return text if len(text) <= limit else text[: limit - 20] + f"... ({len(text)} chars)"
