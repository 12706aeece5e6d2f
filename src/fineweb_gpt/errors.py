"""The errors users are meant to read, and the one way an error becomes one line.

Every command line prints a UserError as `error: <one line>` and exits 2, with no traceback, so
each message names the culprit (a config key, a file, the step) and the fix. The kinds say what
went wrong, for code that treats them apart:

    UserError           the base: something the user can act on
      ConfigError       the command line, the config or an input file cannot work
      DiskFull          a write found no space (or quota) left; what was written before is whole
      OutOfMemory       the GPU ran out of memory at this micro-batch
      TrainingDiverged  the loss became non-finite, or spiked and the guard stopped the run
"""

import sys


class UserError(Exception):
    """A problem the user can fix; its message is printed as one line."""


class ConfigError(UserError, ValueError):
    """A problem in the command line, config or input files (a ValueError too, for callers that
    validate values, like Hydra's instantiate)."""


class DiskFull(UserError):
    """No space or quota left for a write; the message says what is still whole."""


class OutOfMemory(UserError):
    """CUDA out of memory; the message gives the micro-batch that fits the same tokens per step."""


class TrainingDiverged(UserError):
    """The loss guard stopped the run; the message names the step and the last good checkpoint."""


USER_ERROR_NAMES = tuple(kind.__name__ for kind in (UserError, ConfigError, DiskFull, OutOfMemory, TrainingDiverged))


def one_line(err: BaseException, limit: int = 300) -> str:
    """An error's message on one line. A UserError raised in a DataLoader worker arrives inside
    the worker's traceback text: its own last line is what the user needs."""
    text = str(err).strip()
    for name in USER_ERROR_NAMES:
        marker = f"{name}: "
        if marker in text:
            text = text.rsplit(marker, 1)[-1].splitlines()[0]
            break
    text = " ".join(text.split()) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def exit_with(err: BaseException, status: int = 2) -> None:
    """Print `error: <one line>` on stderr and exit: what every command line does with a UserError."""
    print(f"error: {one_line(err, limit=2000)}", file=sys.stderr)
    sys.exit(status)
