"""The bot SDK moved to its own package, ``client_demo/postbox_bot``
(``pip install ./client_demo/postbox_bot``, then ``import postbox_bot``);
this name re-exports it for code that imports ``client_demo.bot.sdk``."""
from client_demo.postbox_bot import *  # noqa: F401,F403
from client_demo.postbox_bot import __all__  # noqa: F401
