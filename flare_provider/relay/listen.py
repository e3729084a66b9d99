"""Where a relay listens: its listening sockets for a host setting, and how to say what they are.

``::`` (the kits' default, also taken for an empty host) is every address of the machine:
one dual-stack socket (``IPV6_V6ONLY`` off) that takes IPv6 and IPv4 connections alike, so
sites whose host names resolve to either reach the relay. A machine without IPv6 gets
``0.0.0.0`` (every IPv4 address) instead. ``0.0.0.0`` means IPv4 only, as everywhere else;
any other name or address is each address it resolves to (``localhost``: 127.0.0.1 and ::1).
"""

from __future__ import annotations

import errno
import socket

from .dial import host_port

EVERY_ADDRESS = "::"
_BACKLOG = 512
# What binding "::" fails with where the kernel or the interpreter has no IPv6 at all;
# anything else (the port taken, say) is a real error and is raised.
_NO_IPV6 = {errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL, errno.EPROTONOSUPPORT}


def open_listeners(host: str, port: int) -> tuple[list[socket.socket], str]:
    """Bound, listening, non-blocking sockets for ``host``:``port``, and a line saying where they listen.

    With port 0 every socket gets the port the first one was given. Raises OSError (the port
    taken, an address not this machine's); no socket is left open then.
    """
    if host.strip("[]") in ("", EVERY_ADDRESS):
        listener, where = _every_address(port)
        listeners = [listener]
    else:
        listeners = _each_address(host, port)
        where = ", ".join(_describe(listener) for listener in listeners)
    try:
        for listener in listeners:
            listener.listen(_BACKLOG)
            listener.setblocking(False)
    except OSError:
        for listener in listeners:
            listener.close()
        raise
    return listeners, where


def _every_address(port: int) -> tuple[socket.socket, str]:
    if socket.has_ipv6:
        try:
            listener = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        except OSError as exc:
            if exc.errno not in _NO_IPV6:
                raise
            missing = str(exc)
        else:
            try:
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                listener.bind(("::", port))
                return listener, f"{_describe(listener)} (every address, IPv6 and IPv4)"
            except OSError as exc:
                listener.close()
                if exc.errno not in _NO_IPV6:
                    raise
                missing = str(exc)
    else:
        missing = "this Python was built without IPv6"
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("0.0.0.0", port))
    except OSError:
        listener.close()
        raise
    return listener, f"{_describe(listener)} (every IPv4 address; no IPv6 on this machine: {missing})"


def _each_address(host: str, port: int) -> list[socket.socket]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    listeners: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            listener = socket.socket(family, kind, proto)
            listeners.append(listener)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:  # a name may resolve to both families: each socket keeps to its own
                listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            listener.bind(address if len(listeners) == 1 else (address[0], port, *address[2:]))
            port = port or listener.getsockname()[1]  # port 0: every address gets the first one's port
    except OSError:
        for listener in listeners:
            listener.close()
        raise
    return listeners


def _describe(listener: socket.socket) -> str:
    host, port = listener.getsockname()[:2]
    return host_port(host, port)


def peer_address(peer: tuple) -> str:
    """``host:port`` of an accepted connection; an IPv4 peer of a dual-stack socket as plain IPv4."""
    host, port = peer[0], peer[1]
    if host.startswith("::ffff:") and "." in host:
        return f"{host[len('::ffff:'):]}:{port}"
    return host_port(host, port)
