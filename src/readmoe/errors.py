"""`UserError`: bad input the caller can fix.

The CLI prints its message as one line (parameters named in backticks become its flags) and exits with code 2,
never a traceback.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input the caller can fix. Messages name Python parameters in backticks (`keep`, `overwrite=True`);
    the CLI prints one line with them as its flags (--keep, --overwrite) and exits with code 2."""
