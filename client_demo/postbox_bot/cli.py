"""Running a bot from the command line: the options the example bots
share (each with an environment fallback) and a clean stop on SIGINT or
SIGTERM.

``python -m postbox_bot.cli [options] MODULE[:FUNCTION]`` (or the
``postbox-bot`` command the package installs) runs a bot whose handlers
``FUNCTION(bot)`` (default ``setup``) in ``MODULE`` (a module name, or a
``.py`` file) attaches, e.g.::

    POSTBOX_TOKEN=... python -m postbox_bot.cli --state echo.json mybot
"""
import argparse
import asyncio
import importlib
import importlib.util
import logging
import os
import signal
import sys
from pathlib import Path

from .client import Bot
from .errors import BotError


def argument_parser(description) -> argparse.ArgumentParser:
    """Command-line options shared by the example bots, each with an
    environment fallback: --url (POSTBOX_URL), --token (POSTBOX_TOKEN),
    --username/--password (POSTBOX_USERNAME/POSTBOX_PASSWORD: a regular
    user account run as a bot; bot accounts have no password) and --state
    (POSTBOX_STATE)."""
    env = os.environ.get
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument('--url', default=env('POSTBOX_URL',
                                             'http://127.0.0.1:8080'))
    parser.add_argument('--token', default=env('POSTBOX_TOKEN'),
                        help='bot token from POST /api/bots (the usual way)')
    parser.add_argument('--username', default=env('POSTBOX_USERNAME'),
                        help='instead of --token: a regular user account '
                        'run as a bot. Bot accounts (POST /api/bots) cannot '
                        'log in with a password: give them --token')
    parser.add_argument('--password', default=env('POSTBOX_PASSWORD'),
                        help='the password of --username')
    parser.add_argument('--state', default=env('POSTBOX_STATE'),
                        help='JSON file keeping the last seq per room (and '
                        'the refreshed token: keep it private)')
    parser.add_argument('-v', '--verbose', action='store_true')
    return parser


def bot_from_args(args) -> Bot:
    """A Bot from :func:`argument_parser`'s options."""
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format='%(asctime)s %(name)s %(levelname)s %(message)s')
    if not args.token and not (args.username and args.password):
        raise SystemExit('give --token (or POSTBOX_TOKEN), or --username '
                         'and --password (a user account, not a bot one)')
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


def _load_setup(spec):
    """The function ``MODULE[:FUNCTION]`` names (FUNCTION: ``setup``)."""
    target, _, name = spec.partition(':')
    if target.endswith('.py'):
        path = Path(target)
        module_spec = importlib.util.spec_from_file_location(path.stem, path)
        if module_spec is None:
            raise SystemExit(f'cannot load {target}')
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[path.stem] = module
        module_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(target)
    try:
        return getattr(module, name or 'setup')
    except AttributeError:
        raise SystemExit(f'{target} has no function {name or "setup"}(bot)'
                         ) from None


def main(argv=None):
    """``python -m postbox_bot.cli [options] MODULE[:FUNCTION]``."""
    parser = argument_parser('Run a Postbox bot: FUNCTION(bot) (default '
                             'setup) of MODULE attaches its handlers.')
    parser.add_argument('setup', metavar='MODULE[:FUNCTION]',
                        help='a module name or a .py file, e.g. mybot or '
                        'mybot.py:attach')
    args = parser.parse_args(argv)
    if os.getcwd() not in sys.path and '' not in sys.path:
        sys.path.insert(0, os.getcwd())  # the postbox-bot command's case
    setup = _load_setup(args.setup)
    run_forever(setup(bot_from_args(args)))


if __name__ == '__main__':
    main()
