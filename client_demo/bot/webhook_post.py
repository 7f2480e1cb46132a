"""Post one message through the HTTP API, e.g. a CI notification:

    python -m client_demo.bot.webhook_post --url http://127.0.0.1:8080 \\
        --token BOT_TOKEN --room 12 --body "build 841 passed"
    echo "deploy done" | python -m client_demo.bot.webhook_post --to alice

``--to USERNAME`` posts in the bot's dm with that user (the dm must exist:
the user has written to the bot, or the bot opened it). The body comes from
--body or stdin. Retries on 5xx, 429 and network errors with the same
client_msg_id, so a retry never posts twice. POSTBOX_URL and POSTBOX_TOKEN
are the fallbacks for --url and --token. Prints the stored message as JSON.
"""
import argparse
import asyncio
import json
import os
import sys
import uuid

import aiohttp


class PostFailed(Exception):
    """The server refused the message (or never answered)."""


async def request(session, method, url, token, body=None):
    """One HTTP request; ``(status, JSON body or None)``."""
    async with session.request(method, url, json=body, headers={
            'Authorization': f'Bearer {token}'}) as resp:
        try:
            data = await resp.json(content_type=None)
        except ValueError:
            data = None
        return resp.status, data


async def find_dm(session, url, token, username) -> int:
    """The id of the caller's dm room with ``username``."""
    status, data = await request(session, 'GET', f'{url}/api/rooms', token)
    if status != 200:
        raise PostFailed(f'GET /api/rooms: {status} {data}')
    for entry in data['rooms']:
        room = entry['room']
        if room['kind'] == 'dm' and any(
                m['username'] == username.lower() for m in room['members']):
            return room['id']
    raise PostFailed(f'no dm with {username}; they must write to the bot first')


async def post(url, token, body, room_id=None, to=None, client_msg_id=None,
               attempts=5, timeout=10.0) -> dict:
    """Post ``body`` to ``room_id`` (or the dm with ``to``); returns the
    stored message. Retries with the same client_msg_id."""
    url = url.rstrip('/')
    client_msg_id = client_msg_id or str(uuid.uuid4())
    delay = 0.5
    async with aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        if room_id is None:
            room_id = await find_dm(session, url, token, to)
        for attempt in range(attempts):
            try:
                status, data = await request(
                    session, 'POST', f'{url}/api/rooms/{room_id}/messages',
                    token, {'body': body, 'client_msg_id': client_msg_id})
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                status, data = None, str(exc)
            if status in (200, 201):
                return data['message']
            retryable = status is None or status == 429 or status >= 500
            if not retryable or attempt == attempts - 1:
                raise PostFailed(f'{status}: {data}')
            error = (data or {}).get('error', {}) if isinstance(data, dict) else {}
            await asyncio.sleep(error.get('retry_after') or delay)
            delay *= 2


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
