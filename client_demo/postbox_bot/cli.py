"""Running a bot from the command line: the options the example bots
share (each with an environment fallback) and a clean stop on SIGINT or
SIGTERM."""
import argparse
import asyncio
import logging
import os
import signal

from .client import Bot
from .errors import BotError


def argument_parser(description) -> argparse.ArgumentParser:
    """Command-line options shared by the example bots, each with an
    environment fallback: --url (POSTBOX_URL), --token (POSTBOX_TOKEN),
    --username/--password (POSTBOX_USERNAME/POSTBOX_PASSWORD) and --state
    (POSTBOX_STATE)."""
    env = os.environ.get
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument('--url', default=env('POSTBOX_URL',
                                             'http://127.0.0.1:8080'))
    parser.add_argument('--token', default=env('POSTBOX_TOKEN'),
                        help='bot token from POST /api/bots')
    parser.add_argument('--username', default=env('POSTBOX_USERNAME'))
    parser.add_argument('--password', default=env('POSTBOX_PASSWORD'))
    parser.add_argument('--state', default=env('POSTBOX_STATE'),
                        help='JSON file keeping the last seq per room')
    parser.add_argument('-v', '--verbose', action='store_true')
    return parser


def bot_from_args(args) -> Bot:
    """A Bot from :func:`argument_parser`'s options."""
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format='%(asctime)s %(name)s %(levelname)s %(message)s')
    if not args.token and not (args.username and args.password):
        raise SystemExit('give --token (or POSTBOX_TOKEN), or --username '
                         'and --password')
    return Bot(args.url, args.token, username=args.username,
               password=args.password, state_path=args.state)


def run_forever(bot: Bot):
    """Run ``bot`` until SIGINT or SIGTERM, then stop it cleanly (the
    handler that is running finishes and the seq map is saved)."""
    async def serve():
        stopping = []

        def on_signal():
            if not stopping:
                stopping.append(asyncio.ensure_future(bot.stop()))

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal)
        await bot.start()
        await bot.wait_stopped()
        if stopping:
            await stopping[0]
    try:
        asyncio.run(serve())
    except BotError as exc:
        raise SystemExit(f'bot stopped: {exc}') from None


def main_for(setup, description, argv=None):
    """A bot script's ``main``: ``setup(bot)`` attaches the handlers to a
    Bot made from the command line, which then runs until a signal."""
    args = argument_parser(description).parse_args(argv)
    run_forever(setup(bot_from_args(args)))
