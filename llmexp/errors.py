"""User errors: bad input the user can fix, reported in one paragraph with exit code 2."""

from __future__ import annotations

EXIT_USER_ERROR = 2


class UserError(Exception):
    """Bad input. The message names the field, the value and the fix; no traceback is shown."""
