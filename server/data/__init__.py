"""The data layer: every SQL statement of Postbox lives here, as named
functions the services call (inside the writer's transaction or on a
reader thread), the way Synapse keeps its SQL in ``storage/``.

- ``database``: opening the database, ``execute`` for plain SQL, and the
  ``Dialect`` chosen once when the database opens (SQLite or PostgreSQL):
  the few statements that differ between them are its methods, so no
  service branches on the backend.
- ``faults``: what kind of failure a database error is.
- ``messages``: the send path's batched statements, message events,
  reactions, history, read markers and catch-up.
- ``groups``: creating a group, locking it for a change, its memberships
  and the 'room' events and departures of its changes.
- ``rooms``: the room cache's loads, dms, blocks, read markers, and the
  inbox's set-based queries.
- ``rows``: messages, reactions and attachments as plain rows, which
  ``server.services.serialize`` turns into the contract's objects.
- ``users``: accounts, bots, sign-in rows and token revocation.
- ``attachments``: uploads, the totals their quota counts, the sweep.
- ``presence``: who may see whose presence, last-seen times.
- ``push``, ``webhooks``: subscriptions, webhook rows, and what a batch
  of deliveries reads.
- ``outbox``: who listens to a room, outbox rows, the dispatcher's claim.

Still outside it: the search index (``models.search``), a per-dialect
object of the schema with its own migrations and backfill, which
``server.services.search`` calls directly.

Functions here take and return plain values (ids, tuples, dicts); the
rules (who may do what, what is refused) stay in ``server.services``.
"""
