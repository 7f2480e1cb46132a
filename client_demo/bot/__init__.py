"""Postbox bot SDK (``client_demo.bot.sdk``) and example bots:
``echo_bot``, ``remind_bot`` and ``webhook_post``, each runnable with
``python -m client_demo.bot.<name> --url ... --token ...``."""
from client_demo.bot.sdk import Bot, BotError, LoginFailed

__all__ = ['Bot', 'BotError', 'LoginFailed']
