"""How deeply decoded JSON nests, for the payload limits of both
transports (Socket.IO events and HTTP bodies)."""


def is_depth_error(exc: BaseException) -> bool:
    """Whether a JSON decoding error is about nesting (orjson: "depth limit
    exceeded"; the stdlib: RecursionError) rather than bad syntax."""
    return isinstance(exc, RecursionError) or 'depth' in str(exc) or \
        'recursion' in str(exc).lower()


def deeper_than(data, limit: int) -> bool:
    """Whether decoded JSON ``data`` nests arrays and objects more than
    ``limit`` deep (``[]`` is 1 deep, a scalar 0). Walks without recursion,
    so any depth is safe, and stops at the first level too deep."""
    stack = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            children = value.values()
        elif isinstance(value, list):
            children = value
        else:
            continue
        if depth > limit:
            return True
        for child in children:
            if isinstance(child, (dict, list)):
                stack.append((child, depth + 1))
    return False
