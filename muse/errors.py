"""The one base class of mistakes a user makes and can fix (config, data, missing extras or inputs).

The CLI prints them as one line and the flow ends its run in a Failed state with that line, so a
user's mistake never shows as a traceback; any other exception is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A mistake the user can fix; the message says what and where, in one line."""
