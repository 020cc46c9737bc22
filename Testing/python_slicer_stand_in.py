"""Stand-in for Slicer's `PythonSlicer` in the headless test harness (`Testing/slicer_headless.py`).

`PythonSlicer` is a CTKAppLauncher: it starts the real interpreter (`python-real`) as its child with the same
arguments, waits for it and exits with its code, and forwards no signal. So does this: SIGTERM and SIGINT sent to
it are ignored, so a Stop or Cancel that signals only the process it started leaves the work running, as in Slicer.

The real interpreter: `MEDDINOV3_TEST_SLICER_PYTHON` (the Slicer-Python test leg points it at a Python 3.9 venv
like Slicer 5.8's), else the interpreter running this file.
"""

import os
import signal
import subprocess
import sys


def _ignore(signum, frame):
    """A handler rather than SIG_IGN: an ignored signal would be inherited by the child; a handler is not."""


def main() -> int:
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _ignore)
    real = os.environ.get("MEDDINOV3_TEST_SLICER_PYTHON") or sys.executable
    code = subprocess.Popen([real, *sys.argv[1:]]).wait()
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main())
