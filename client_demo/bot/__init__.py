"""Example bots on the Postbox bot SDK (the package
``client_demo/postbox_bot``): ``echo_bot``, ``remind_bot`` and
``webhook_post``, each runnable with
``python -m client_demo.bot.<name> --url ... --token ...`` from a Postbox
checkout, or (the SDK installed) ``python <name>.py ...``. The SDK's names
are re-exported here for older imports (``from client_demo.bot import
Bot``)."""
from client_demo.postbox_bot import Bot, BotError, LoginFailed

__all__ = ['Bot', 'BotError', 'LoginFailed']
