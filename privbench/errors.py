"""The one exception type that means "the user asked for something invalid"."""


class UserError(Exception):
    """Bad input. The command line prints the message on one line and exits with code 2."""
