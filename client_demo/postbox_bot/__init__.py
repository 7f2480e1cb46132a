"""postbox_bot: an async bot SDK for Postbox, on python-socketio's client.

    from postbox_bot import Bot

    bot = Bot('http://127.0.0.1:8080', token=TOKEN, state_path='bot.json')

    @bot.on_message
    async def echo(message):
        if message['sender']['is_bot']:
            return  # two echo bots in a room would answer each other
        await bot.send(room_id=message['room_id'], body=message['body'],
                       client_msg_id=f'echo-{message["id"]}')

    asyncio.run(bot.run())

Modules: ``client`` (the Bot: connecting, reconnecting, recovery),
``events`` (the dispatcher: every event once, in order), ``api`` (requests:
send, search, groups, inbox pages, HTTP), ``webhook`` (webhook mode and
signature checks), ``state`` (the state file), ``tokens`` (token
refresh), ``cli`` (command-line bots: ``python -m postbox_bot.cli``),
``socketio_async_client`` (the one override of python-socketio, pinned).
Inside the Postbox repo the package is also ``client_demo.postbox_bot``.
"""
from .client import Bot
from .errors import BotError, LoginFailed
from .webhook import WEBHOOK_TOLERANCE_SECONDS, verify_signature

__all__ = ['Bot', 'BotError', 'LoginFailed', 'WEBHOOK_TOLERANCE_SECONDS',
           'argument_parser', 'bot_from_args', 'main_for', 'run_forever',
           'verify_signature']

_CLI_NAMES = ('argument_parser', 'bot_from_args', 'main_for', 'run_forever')


def __getattr__(name):
    # The command-line helpers load on first use, so that ``python -m
    # postbox_bot.cli`` runs cli as a fresh module (not one imported by
    # the package already, which runpy warns about).
    if name in _CLI_NAMES:
        from . import cli
        return getattr(cli, name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
