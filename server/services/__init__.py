"""Postbox's rules. Nothing here imports Socket.IO or aiohttp: services take
plain values, return plain data and raise ``server.errors.PostboxError``."""
