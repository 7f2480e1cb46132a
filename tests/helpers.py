"""Old import path of the test kit (``tests.kit``), kept for the test files
that still import it from here."""
from tests.kit import *  # noqa: F401,F403
from tests.kit import __all__  # noqa: F401
