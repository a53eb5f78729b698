"""The one exception type the CLI turns into a one-line message and exit code 2.

Raise `UserError` for anything a user can fix (a bad file, key, id or value);
its message must name the culprit. Everything else is a bug and keeps its
traceback.
"""


class UserError(Exception):
    """Bad input from the user: the message names the file, key or id at fault."""
