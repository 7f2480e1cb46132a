"""Every override of, and reach into, the internals of Postbox's
frameworks: python-engineio, python-socketio (and one of aiohttp's).

Nothing else in ``server/`` subclasses a python-engineio or
python-socketio class, replaces one of their methods or reads one of their
private names: it imports the subclasses and helpers from here. What is
here is pinned: ``setup.cfg`` allows only the minor versions of
python-engineio and python-socketio that ``tests/test_upstream.py`` (the
drift test) checks, and docs/architecture.md ("Upgrading python-engineio /
python-socketio") says how to move to new ones.

The convention, which every module here follows:

- One module per upstream class, named after it: ``<package>_<class>``,
  e.g. ``engineio_server.py`` for ``engineio.AsyncServer``,
  ``engineio_socket.py`` for ``engineio.async_socket.AsyncSocket``,
  ``socketio_server.py`` for ``socketio.AsyncServer``,
  ``socketio_manager.py`` for ``socketio.AsyncManager``,
  ``socketio_pubsub_manager.py`` for
  ``socketio.async_pubsub_manager.AsyncPubSubManager``,
  ``socketio_packet.py`` for ``socketio.packet.Packet``. What is not an
  override (a queue, a schedule, a rule of Postbox's own) lives elsewhere.
- The module docstring lists the upstream names the module touches and
  why.
- Three constants, read by the drift test:

  ``UPSTREAM``
      the upstream class the module is named after.
  ``PRIVATE_NAMES``
      ``{'package.module.Class._name': 'why'}``: every private name of
      python-engineio / python-socketio (or aiohttp) the module
      overrides, calls or reads, fully qualified. The test checks each one
      exists in the installed (pinned) version, as a class attribute or as
      an attribute the class's own code sets on ``self``. It also scans the
      module's source: a ``._name`` the module uses (or a ``_name`` method
      it defines) that is an attribute of an upstream class named here but
      is not declared, or that is neither declared nor defined in the
      module, fails the test.
  ``COPIED``
      ``{'package.module.Class.method': 'sha256 prefix'}``: the upstream
      code the module copies or mirrors (a method partly rewritten, checks
      repeated from an upstream handler, a class whose behaviour an
      override depends on), by the first 16 hex digits of the SHA-256 of
      ``inspect.getsource``. An upgrade that changes one fails the test
      until the module has been re-read against the new code and the hash
      updated.

Public upstream API (``AsyncServer.emit``, ``packet.Packet``, the
``exceptions``) needs no declaration and may be used anywhere.
"""
