"""The one exception type the app turns into a one-line message and a non-zero exit."""


class SpecsweepError(Exception):
    """Bad input or an impossible request, detected before (or instead of) expensive work."""
