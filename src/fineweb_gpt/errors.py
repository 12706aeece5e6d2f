"""The one exception type users are meant to read, and the one way an error becomes one line."""

import sys


class ConfigError(ValueError):
    """A problem the user can fix in their command line, config or input files.

    The entry points print its message as a single line (no traceback), so the message
    must name the culprit (a config key, a file) and the fix.
    """


def one_line(err: BaseException, limit: int = 300) -> str:
    """An error's message on one line. A ConfigError raised in a DataLoader worker arrives
    inside the worker's traceback text: its own last line is what the user needs."""
    text = str(err).strip()
    if "ConfigError: " in text:
        text = text.rsplit("ConfigError: ", 1)[-1].splitlines()[0]
    text = " ".join(text.split()) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def exit_with(err: BaseException, status: int = 2) -> None:
    """Print `error: <one line>` on stderr and exit: what every command line does with a ConfigError."""
    print(f"error: {one_line(err, limit=2000)}", file=sys.stderr)
    sys.exit(status)
