"""The one error type a user fixes: every command prints it as one line and exits with code 2."""

from __future__ import annotations


class UserError(Exception):
    """Bad input (a recipe key, an option, a data file, a reward function's output): the message is one line
    that names what is wrong and what would be right. Commands print `error: <message>` and exit with 2."""
