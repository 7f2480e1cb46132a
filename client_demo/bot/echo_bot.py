"""Echo bot: answers every direct message with the same text, as a reply.

    python -m client_demo.bot.echo_bot --url http://127.0.0.1:8080 --token TOKEN

from a Postbox checkout, or with the SDK installed (``pip install
./client_demo/postbox_bot``) ``python echo_bot.py ...`` or ``python -m
postbox_bot.cli ... echo_bot`` (or set POSTBOX_URL and POSTBOX_TOKEN). Create
the bot's token with ``POST /api/bots``; add ``--state echo.json`` so a
restarted bot answers what it missed while it was down.
"""
import logging

try:  # the SDK installed (pip install ./client_demo/postbox_bot)
    from postbox_bot import Bot, main_for
except ImportError:  # run from a Postbox checkout: python -m client_demo...
    from client_demo.postbox_bot import Bot, main_for

log = logging.getLogger(__name__)


def setup(bot: Bot) -> Bot:
    """Attach the echo handler to ``bot``."""
    @bot.on_message
    async def echo(message):
        # Only dms: in a group an echo bot would be noise. Attachment-only
        # messages have no text to echo. Never another bot's: two echo
        # bots (in a dm, or a group) would answer each other forever.
        if not bot.is_dm(message['room_id']) or not message['body'] or \
                message['sender'].get('is_bot'):
            return
        # A client_msg_id derived from the message makes the echo
        # idempotent: if the bot dies between sending and saving its seq,
        # the replayed message gets the same echo back, not a second one.
        await bot.send(room_id=message['room_id'], body=message['body'],
                       reply_to=message['id'],
                       client_msg_id=f'echo-{message["id"]}')
    return bot


def main(argv=None):
    main_for(setup, __doc__.splitlines()[0], argv)


if __name__ == '__main__':
    main()
