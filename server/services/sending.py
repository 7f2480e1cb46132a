"""The send path's writer half: the sends that queued while the writer's
last commit ran, checked against the database and stored together in a
few statements (``store_sends``, a ``Batched`` write operation that runs
in the writer process, ``server.writer_process``).
``server.services.messages.send_message`` checks a send and queues it.
"""
from typing import NamedTuple

from server.data import messages as data
from server.data import rooms as rooms_data
from server.errors import Conflict, Forbidden, Invalid
from server.services import outbox
from server.services.context import now_ms
from server.services.serialize import (attachment_dict, load_users,
                                       message_dict, new_message_dict)
from server.store import Batched


class SendRequest(NamedTuple):
    """One checked send, as the writer's batched ``store_sends`` takes it:
    ``room`` is the RoomInfo the sender was found a member of (cached; a
    group's membership is checked again in the transaction). A named
    tuple, not a frozen dataclass: one is made per message on the hot
    path, and a frozen dataclass costs about three times as much to
    build."""
    ctx: object
    room: object
    sender_id: int
    body: str
    client_msg_id: str
    attachment_ids: tuple
    reply_to: int | None


def _refusal(request, blocked, claimed, replies, unsent):
    """The error refusing this send, or None (the checks that need the
    database, read once for the whole batch). ``claimed``: attachments an
    earlier send of the same batch takes (the database does not show them
    taken yet); ``replies`` and ``unsent``: ``data.rooms_of`` and
    ``data.unsent_uploads`` of the batch."""
    room, sender_id = request.room, request.sender_id
    if room.kind == 'dm' and (room.other_member(sender_id),
                              sender_id) in blocked:
        return Forbidden('this user does not accept your messages')
    if request.reply_to is not None and \
            replies.get(request.reply_to) != room.id:
        return Invalid('reply_to: no such message in this room')
    if any(unsent.get(a) != sender_id for a in request.attachment_ids) or \
            claimed.intersection(request.attachment_ids):
        return Invalid('attachments: only your own uploads, not yet sent')
    return None


def _reused():
    return Conflict('client_msg_id: already used for another message')


def _retry(ctx, message_id, room_id, body):
    """The outcome of a send whose (sender, client_msg_id) is already
    stored: the first message, not created again, if this is its retry
    (same room and body; an edited or deleted message no longer shows the
    body it was sent with, so there the room decides); else a Conflict."""
    message = data.get_message(message_id)
    if message.room_id != room_id or (
            message.body != body and message.edited_at is None and
            not message.deleted):
        return _reused()
    return message_dict(ctx, message), False, None


def _redone(results, prepared):
    """The answers of a run of sends that the writer process failed during
    after preparing its COMMIT (``prepared``: its outcomes), run again by
    the writer thread. If that COMMIT happened, the run's messages came
    back as retries: a message the process had created is this run's own,
    so its first send is answered as new (``created``: it is delivered
    live), and only that one. A client's retry of an older message stays
    a retry; so does a message another process stored meanwhile under an
    id the lost run had used and rolled back (SQLite reuses it), told
    apart by its seq and time. Such a message keeps the members the
    process read with it (the members as of its seq)."""
    made = {_identity(outcome[0]): outcome[2] for outcome, error in prepared
            if error is None and outcome[1]}
    seen = set()
    answered = []
    for future, outcome, error in results:
        if error is None:
            message, created, members = outcome
            if not created and message['id'] not in seen and \
                    _identity(message) in made:
                outcome = (message, True, made[_identity(message)])
            seen.add(message['id'])
        answered.append((future, outcome, error))
    return answered


def _identity(message):
    return message['id'], message['room_id'], message['seq'], \
        message['created_at']


@Batched.in_writer_process(_redone)
def store_sends(requests):
    """Store many sends in a few statements: the writer (its process, or
    its thread) calls this with every send that queued while its last
    commit ran. Returns, per request, either ``(message dict, created,
    member ids)`` or the PostboxError that refuses it. The member ids of
    a new message in a group are read in the transaction after its seq
    was taken: the members as of that seq, so a member removed or added a
    moment before (on any process) gets it live or not as ``sync`` says;
    None for a dm (its members never change) and for a retry.

    The hot path of Postbox. Every check comes before any write, so a
    refused send writes nothing and needs no savepoint; then each room
    takes its block of seqs in one UPDATE, and the messages and their
    events are inserted a chunk of rows per statement. A retry of a
    message stored earlier, or of one earlier in the same batch, returns
    that message with ``created`` False; the same client_msg_id for
    another room or another body is a Conflict."""
    ctx = requests[0].ctx
    outcomes = [None] * len(requests)
    stored = data.stored_ids({(r.sender_id, r.client_msg_id)
                              for r in requests})
    blocked = data.blocks_by({r.room.other_member(r.sender_id)
                              for r in requests if r.room.kind == 'dm'})
    # The cached member list that let a send this far may be stale (a
    # member removed meanwhile, on any process): group senders are checked
    # here, inside the transaction. A dm's members never change. The
    # batch's rooms are locked first (PostgreSQL: a removal on another
    # process holds its room until it commits; all of them, in id order,
    # as take_seqs locks them), so the check sees any removal that comes
    # before these sends' seqs.
    groups = {(r.room.id, r.sender_id) for r in requests
              if r.room.kind != 'dm'}
    if groups:
        data.lock_rooms({r.room.id for r in requests})
    members = data.memberships(groups)
    # What replies and attachments refer to, read once for the batch.
    replies = data.rooms_of({r.reply_to for r in requests
                             if r.reply_to is not None})
    unsent = data.unsent_uploads({a for r in requests
                                  for a in r.attachment_ids})
    accepted, first = [], {}  # indexes to store; (sender, cmid) -> index
    claimed = set()  # attachments of the sends accepted so far
    for i, request in enumerate(requests):
        key = (request.sender_id, request.client_msg_id)
        room_id = request.room.id
        if request.room.kind != 'dm' and \
                (room_id, request.sender_id) not in members:
            outcomes[i] = Forbidden('you are not a member of this room')
        elif key in stored:
            outcomes[i] = _retry(ctx, stored[key], room_id, request.body)
        elif key in first:
            earlier = requests[first[key]]
            # A retry is resolved to its message below.
            outcomes[i] = (first[key] if (earlier.room.id, earlier.body) ==
                           (room_id, request.body) else _reused())
        else:
            outcomes[i] = _refusal(request, blocked, claimed, replies, unsent)
            if outcomes[i] is None:
                claimed.update(request.attachment_ids)
                first[key] = i
                accepted.append(i)
    if accepted:
        _store_new(ctx, requests, accepted, outcomes)
    for i, outcome in enumerate(outcomes):
        if isinstance(outcome, int):  # a retry within this batch
            outcomes[i] = (outcomes[outcome][0], False, None)
    return outcomes


def _store_new(ctx, requests, accepted, outcomes):
    """Insert the accepted sends and put their (message, True) outcomes."""
    now = now_ms()
    per_room = {}
    for i in accepted:
        per_room.setdefault(requests[i].room.id, []).append(i)
    lasts = data.take_seqs({r: len(ix) for r, ix in per_room.items()}, now)
    # Read after the rooms' rows were updated (locked until the commit, on
    # PostgreSQL): a membership change that took a seq before these is
    # committed and seen; one after them waits for this commit.
    members = rooms_data.members_of(sorted({
        requests[i].room.id for i in accepted
        if requests[i].room.kind != 'dm'}))
    seqs = {}
    for room_id, indexes in per_room.items():
        first_seq = lasts[room_id] - len(indexes) + 1
        for offset, i in enumerate(indexes):
            seqs[i] = first_seq + offset
    ids = data.insert_messages([
        (requests[i].room.id, seqs[i], requests[i].sender_id,
         requests[i].body, requests[i].client_msg_id, requests[i].reply_to,
         now) for i in accepted])
    message_ids = {i: ids[requests[i].room.id, seqs[i]] for i in accepted}
    # Pushes and webhook deliveries, in this same transaction: an acked
    # message never loses its notification.
    outbox.queue_messages(
        ctx, [(requests[i].room.id, seqs[i], message_ids[i],
               requests[i].sender_id) for i in accepted], now)
    senders = load_users(ctx, [requests[i].sender_id for i in accepted])
    files = data.attach_uploads({message_ids[i]: requests[i].attachment_ids
                                 for i in accepted
                                 if requests[i].attachment_ids})
    for i in accepted:
        r = requests[i]
        outcomes[i] = (new_message_dict(
            message_ids[i], r.room.id, seqs[i], senders[r.sender_id], r.body,
            r.client_msg_id, r.reply_to, now,
            [attachment_dict(a) for a in files.get(message_ids[i], ())]),
            True, None if r.room.kind == 'dm' else
            tuple(members.get(r.room.id, ())))
