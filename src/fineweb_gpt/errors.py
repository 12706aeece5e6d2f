"""The one exception type users are meant to read."""


class ConfigError(ValueError):
    """A problem the user can fix in their command line, config or input files.

    The entry points print its message as a single line (no traceback), so the message
    must name the culprit (a config key, a file) and the fix.
    """
