"""The address of the client behind a request, through trusted proxies.

Behind nginx every connection comes from the proxy. When the peer is one
of ``trusted_proxies`` (addresses or networks from the config), the client
is the nearest address in ``X-Forwarded-For`` that is not itself a trusted
proxy: the hops a client wrote there itself come before it and cannot be
used to pose as someone else. Without trusted proxies the header is
ignored, so a client cannot dodge the per-address limits by sending it.
"""
import functools
import ipaddress


@functools.lru_cache(maxsize=8)
def networks(values: tuple) -> tuple:
    """The ``ip_network`` of each configured value; ValueError if one is
    not an address or network."""
    return tuple(ipaddress.ip_network(v, strict=False) for v in values)


def _trusted(address, trusted) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in trusted)


def client_address(request, trusted_proxies: tuple) -> str | None:
    """``request.remote``, or when that is a trusted proxy, the client
    address it forwarded."""
    remote = request.remote
    trusted = networks(trusted_proxies)
    if not trusted or not _trusted(remote, trusted):
        return remote
    hops = [hop.strip() for header in
            request.headers.getall('X-Forwarded-For', ())
            for hop in header.split(',') if hop.strip()]
    for hop in reversed(hops):
        if not _trusted(hop, trusted):
            try:
                return str(ipaddress.ip_address(hop))
            except ValueError:  # not from a proxy of ours: keep the peer
                return remote
    return hops[0] if hops else remote
