"""Post one message once over HTTP, e.g. a CI notification.

``POST /api/messages``: despite its name this script neither receives nor
needs a webhook; it is how a script (or a bot in webhook mode) sends.

    python -m client_demo.bot.webhook_post --url http://127.0.0.1:8080 \\
        --token BOT_TOKEN --room 12 --body "build 841 passed"
    echo "deploy done" | python -m client_demo.bot.webhook_post --to alice

``--to USERNAME`` posts in the bot's dm with that user (opened if there is
none yet, unless the user blocks the bot). The body comes from
--body or stdin. Retries on 5xx, 429 and network errors with the same
client_msg_id, so a retry never posts twice. POSTBOX_URL and POSTBOX_TOKEN
are the fallbacks for --url and --token. Prints the stored message as JSON.
HTTP only (the SDK's ``Bot.http``): no socket is opened.
"""
import argparse
import asyncio
import json
import os
import sys
import uuid

import aiohttp

try:  # the SDK installed (pip install ./client_demo/postbox_bot)
    from postbox_bot import Bot, BotError
except ImportError:  # run from a Postbox checkout: python -m client_demo...
    from client_demo.postbox_bot import Bot, BotError


class PostFailed(Exception):
    """The server refused the message (or never answered)."""


async def post(url, token, body, room_id=None, to=None, client_msg_id=None,
               attempts=5, timeout=10.0) -> dict:
    """Post ``body`` once over HTTP to ``room_id`` (or the dm with
    ``to``); returns the stored message. Retries (5xx, 429, network
    errors) reuse the same client_msg_id, so the message is stored once.
    ``Bot.send`` does the same when the bot runs no socket."""
    bot = Bot(url, token, request_timeout=timeout)
    data = {'body': body, 'client_msg_id': client_msg_id or str(uuid.uuid4()),
            **({'room_id': room_id} if room_id is not None else {'to': to})}
    delay = 0.5
    try:
        for attempt in range(attempts):
            try:
                _, answer = await bot.http('POST', '/api/messages', json=data)
                return answer['message']
            except BotError as exc:
                failure, wait = exc, exc.retry_after
                retryable = exc.status == 429 or (exc.status or 0) >= 500
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                failure, wait, retryable = exc, None, True
            if not retryable or attempt == attempts - 1:
                raise PostFailed(str(failure) or type(failure).__name__)
            await asyncio.sleep(wait or delay)
            delay *= 2
    except BotError as exc:
        raise PostFailed(str(exc)) from None
    finally:
        await bot.close()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--url', default=os.environ.get(
        'POSTBOX_URL', 'http://127.0.0.1:8080'))
    parser.add_argument('--token', default=os.environ.get('POSTBOX_TOKEN'))
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument('--room', type=int, help='room id')
    target.add_argument('--to', help='username of a dm partner')
    parser.add_argument('--body', help='message text (default: stdin)')
    parser.add_argument('--client-msg-id',
                        help='idempotency key (default: a new uuid)')
    args = parser.parse_args(argv)
    if not args.token:
        parser.error('give --token or set POSTBOX_TOKEN')
    body = args.body if args.body is not None else sys.stdin.read().strip()
    if not body:
        parser.error('empty body')
    try:
        message = asyncio.run(post(args.url, args.token, body, args.room,
                                   args.to, args.client_msg_id))
    except PostFailed as exc:
        print(f'webhook_post: {exc}', file=sys.stderr)
        return 1
    print(json.dumps(message))
    return 0


if __name__ == '__main__':
    sys.exit(main())
