"""The error types every command reports in one line: `UserError` (bad input, exit code 2) and `Interrupted` (a signal)."""

from __future__ import annotations

import signal


class UserError(Exception):
    """Bad input (a recipe key, an option, a data file, a reward function's output): the message is one line
    that names what is wrong and what would be right. Commands print `error: <message>` and exit with 2."""


class Interrupted(BaseException):
    """A signal (SIGTERM, SIGINT) asked the run to stop: a BaseException, like KeyboardInterrupt, so no `except Exception`
    swallows it. Commands print `interrupted by SIGTERM <detail>` as one line and exit 128 + the signal's number."""

    def __init__(self, signum: int, detail: str = ""):
        self.signum, self.detail = int(signum), detail
        super().__init__(f"{signal.Signals(signum).name} {detail}".strip())

    @property
    def exit_code(self) -> int:
        return 128 + self.signum
