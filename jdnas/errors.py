"""The one exception type users see: its message is a single line naming the file and field."""


class JdnasError(Exception):
    """A user-facing error (bad params, bad data, missing input). The CLI prints it and exits 2."""


class ConfigError(JdnasError):
    """Invalid params: unknown key, wrong type or out-of-range value."""


class DataError(JdnasError):
    """Invalid dataset: missing file, bad JSON, dangling id, bad box, unreadable image..."""
