"""Postbox: a real-time direct-messaging server."""
