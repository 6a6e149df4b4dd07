"""How the scripts in bench/, data/ and records/plot.py end: bad input is one line on stderr and exit code 2, never
a traceback.

    if __name__ == "__main__":
        run_tool(main)

run_tool runs main() under train_gpt.run_cli (a UsageError: "error: ..." on stderr, exit code 2) and exits with
main's return value. A reader that stops early (`python bench/SCRIPT.py ... | head -1`) ends the script quietly with
exit code 1, and a file that cannot be read or written is one line naming it (exit code 2).
"""
import os
import sys

import train_gpt  # the importer has put the repository's root on sys.path, as for its own import of train_gpt

UsageError, OneLineParser = train_gpt.UsageError, train_gpt.OneLineParser


def run_tool(main):
    """Runs main() and exits with its return value (None: 0); see the module docstring for how it fails."""
    try:
        code = train_gpt.run_cli(main)  # a closed stdout: exit code 1, quietly
    except OSError as e:
        if e.filename is None:
            raise
        print(f"error: {e.filename}: {e.strerror or e}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code)


def positive_int(flag, value, at_most=None):
    """value, or a UsageError naming flag when it is below 1 (or above at_most)."""
    if value < 1 or (at_most is not None and value > at_most):
        limit = f" to {at_most:,}" if at_most is not None else " or more"
        raise UsageError(f"--{flag} {value}: give 1{limit}")
    return value


def writable_folder(flag, path):
    """Creates the folder path (and its parents) for output; a UsageError naming flag when it cannot."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"--{flag} {path} is a file, not a folder: give a folder")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--{flag} {path}: cannot create the folder ({e.strerror or e}); give a folder you can "
                         "write") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UsageError(f"--{flag} {path}: the folder cannot be written; give a folder you can write")
    return path
