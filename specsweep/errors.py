"""The one exception type the app turns into a one-line message and a non-zero exit."""


class SpecsweepError(Exception):
    """Bad input or an impossible request, detected before (or instead of) expensive work."""


class Terminated(BaseException):
    """SIGTERM arrived (`specsweep.app.signals`): not an Exception, so no `except Exception` on the way
    swallows it; the app records it in error.json and exits 143. The finished samples are kept."""
