"""``python -m postbox_bot [options] MODULE[:FUNCTION]``: see ``cli``."""
from .cli import main

main()
