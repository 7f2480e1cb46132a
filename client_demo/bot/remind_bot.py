"""Remind bot: "remind me in 10 minutes stand up" -> replies after 10 minutes.

    python -m client_demo.bot.remind_bot --url http://127.0.0.1:8080 --token TOKEN

(with the SDK installed, ``python remind_bot.py ...`` works too).

Understands seconds, minutes, hours and days ("remind me in 2 seconds ping",
"remind me in 1 hour call mum"). Reminders wait in memory: a restart
forgets the ones not yet due.
"""
import asyncio
import logging
import re

try:  # the SDK installed (pip install ./client_demo/postbox_bot)
    from postbox_bot import Bot, main_for
except ImportError:  # run from a Postbox checkout: python -m client_demo...
    from client_demo.postbox_bot import Bot, main_for

log = logging.getLogger(__name__)

UNITS = {'s': 1, 'sec': 1, 'secs': 1, 'second': 1, 'seconds': 1,
         'm': 60, 'min': 60, 'mins': 60, 'minute': 60, 'minutes': 60,
         'h': 3600, 'hour': 3600, 'hours': 3600,
         'd': 86400, 'day': 86400, 'days': 86400}
PATTERN = re.compile(
    r'^\s*remind me in\s+(\d+(?:\.\d+)?)\s*([a-z]+)\s+(.+?)\s*$',
    re.IGNORECASE | re.DOTALL)
# A week: longer would outlive any in-memory reminder anyway.
MAX_SECONDS = 7 * 86400
HELP = ('Say "remind me in N minutes <text>" (or seconds, hours, days) '
        'and I will send <text> back when it is time.')


def parse(text):
    """``(seconds, "N unit", what)`` for "remind me in N <unit> <what>",
    else None."""
    match = PATTERN.match(text or '')
    if not match or match.group(2).lower() not in UNITS:
        return None
    amount, unit, what = match.groups()
    return float(amount) * UNITS[unit.lower()], f'{amount} {unit}', what


def setup(bot: Bot) -> Bot:
    """Attach the reminder handler to ``bot``."""
    pending = set()  # keeps the tasks referenced until they finish

    async def remind(room_id, message_id, seconds, what):
        await asyncio.sleep(seconds)
        await bot.send(room_id=room_id, body=f'Reminder: {what}',
                       reply_to=message_id,
                       client_msg_id=f'remind-{message_id}')

    @bot.on_message
    async def on_message(message):
        if not bot.is_dm(message['room_id']) or \
                message['sender'].get('is_bot'):
            return  # another bot would get HELP back, and answer it
        request = parse(message['body'])
        # Answers derive their client_msg_id from the request, so a request
        # replayed after a crash is not answered twice.
        answer_id = f'remind-ack-{message["id"]}'
        if request is None:
            await bot.send(room_id=message['room_id'], body=HELP,
                           reply_to=message['id'], client_msg_id=answer_id)
            return
        seconds, amount, what = request
        if seconds > MAX_SECONDS:
            await bot.send(room_id=message['room_id'],
                           body='That is too far ahead; a week at most.',
                           reply_to=message['id'], client_msg_id=answer_id)
            return
        # The wait runs in its own task: handlers run one at a time, and
        # the bot must keep answering while a reminder is pending.
        task = asyncio.create_task(
            remind(message['room_id'], message['id'], seconds, what))
        pending.add(task)
        task.add_done_callback(pending.discard)
        await bot.send(room_id=message['room_id'],
                       body=f'OK, I will remind you in {amount}.',
                       reply_to=message['id'], client_msg_id=answer_id)
    return bot


def main(argv=None):
    main_for(setup, __doc__.splitlines()[0], argv)


if __name__ == '__main__':
    main()
