"""postbox_bot: an async bot SDK for Postbox, on python-socketio's client.

    from postbox_bot import Bot

    bot = Bot('http://127.0.0.1:8080', token=TOKEN, state_path='bot.json')

    @bot.on_message
    async def echo(message):
        await bot.send(room_id=message['room_id'], body=message['body'])

    asyncio.run(bot.run())

Modules: ``client`` (the Bot: connecting, reconnecting, recovery),
``events`` (the dispatcher: every event once, in order), ``api`` (requests:
send, search, groups, inbox pages, HTTP), ``webhook`` (webhook mode and
signature checks), ``state`` (the seq file), ``cli`` (command-line bots),
``socketio_async_client`` (the one override of python-socketio, pinned).
Inside the Postbox repo the package is also ``client_demo.postbox_bot``.
"""
from .cli import argument_parser, bot_from_args, main_for, run_forever
from .client import Bot
from .errors import BotError, LoginFailed
from .webhook import WEBHOOK_TOLERANCE_SECONDS, verify_signature

__all__ = ['Bot', 'BotError', 'LoginFailed', 'WEBHOOK_TOLERANCE_SECONDS',
           'argument_parser', 'bot_from_args', 'main_for', 'run_forever',
           'verify_signature']
