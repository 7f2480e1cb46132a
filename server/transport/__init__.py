"""Socket.IO and HTTP: unpack, call one service, answer, emit."""
