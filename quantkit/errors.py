"""The one error type quantkit raises for bad input; the CLI turns it into a one-line message, exit 2."""


class QuantkitError(Exception):
    """A problem with the user's input (file, config, option), stated in one line."""
