"""Which relays a site that dials out reaches through its HTTP proxy, and which directly.

The proxy is ``proxy:`` in ``local/site.yaml``, else ``https_proxy`` (or ``HTTPS_PROXY``) in
the agent's environment. The relays reached directly are those a ``no_proxy`` list names:
``no_proxy:`` in site.yaml goes with site.yaml's proxy, ``no_proxy`` (or ``NO_PROXY``) in the
environment with the environment's, so a machine-wide setting never changes what site.yaml
says. Each relay is decided on its own: with several relays (high availability) one may be
on the site's network and reached directly while another is reached through the proxy.

A ``no_proxy`` list reads as curl and Python's requests read it: comma-separated entries,
case-insensitive; ``*`` is every host; ``example.org`` and ``.example.org`` (and
``*.example.org``) match that name and every name under it; an IP address matches itself
and ``10.0.0.0/8`` a range; ``:port`` after an entry (``[::1]:8002`` for IPv6) limits it to
that port. Names are not resolved: an address entry matches a relay listed by address.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from flare_provider.relay.dial import HttpProxy, RelayEndpoint

from .errors import SettingsError

_LABEL = r"[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?"
_DOMAIN = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\Z")
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class NoProxyEntry:
    """One entry: a domain (itself and the names under it) or an address range, on any port or one."""

    domain: str | None = None
    network: IpNetwork | None = None
    port: int | None = None

    def matches(self, host: str, address: ipaddress.IPv4Address | ipaddress.IPv6Address | None, port: int) -> bool:
        if self.port is not None and self.port != port:
            return False
        if self.network is not None:
            return address is not None and address.version == self.network.version and address in self.network
        return address is None and (host == self.domain or host.endswith(f".{self.domain}"))


@dataclass(frozen=True)
class NoProxy:
    """A parsed ``no_proxy`` list: the hosts dialled without the proxy."""

    entries: tuple[NoProxyEntry, ...] = ()
    everything: bool = False

    @classmethod
    def parse(cls, text: str) -> "NoProxy":
        """Read a ``no_proxy`` list; raises ValueError naming the first entry that is none of the forms above."""
        entries, everything = [], False
        for raw in text.split(","):
            entry = raw.strip()
            if entry == "*":
                everything = True
            elif entry:
                entries.append(_entry(entry))
        return cls(tuple(entries), everything)

    def matches(self, host: str, port: int) -> bool:
        """Whether ``host``:``port`` (a relay's host as kits list it) is to be dialled directly."""
        if self.everything:
            return True
        host = host.strip().strip("[]").rstrip(".").lower()
        try:
            address = ipaddress.ip_address(host.split("%", 1)[0])  # an IPv6 zone (fe80::1%eth0) is no part of it
        except ValueError:
            address = None
        return any(entry.matches(host, address, port) for entry in self.entries)


def _entry(entry: str) -> NoProxyEntry:
    if "://" in entry:
        raise ValueError(f"no_proxy entry {entry!r} is a URL: list host names (relay.example.org), not URLs")
    host, port = _split_port(entry)
    host = host.lower()
    if "/" in host:
        try:
            return NoProxyEntry(network=ipaddress.ip_network(host, strict=False), port=port)
        except ValueError:
            raise ValueError(f"no_proxy entry {entry!r} is not an address range "
                             f"such as 10.0.0.0/8 or fd00::/8") from None
    try:
        address = ipaddress.ip_address(host)
        return NoProxyEntry(network=ipaddress.ip_network(address), port=port)
    except ValueError:
        pass
    domain = host[1:] if host.startswith("*.") else host  # *.example.org: the form Java and Go accept
    domain = domain.lstrip(".").rstrip(".")
    if not _DOMAIN.match(domain):
        raise ValueError(f"no_proxy entry {entry!r} is not a host name, a domain (.example.org), an IP address, "
                         f"an address range (10.0.0.0/8) or '*'")
    return NoProxyEntry(domain=domain, port=port)


def _split_port(entry: str) -> tuple[str, int | None]:
    """``host[:port]``, ``[v6address][:port]``; a bare IPv6 address (several colons) has no port."""
    if entry.startswith("["):
        host, bracket, rest = entry[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError(f"no_proxy entry {entry!r}: an IPv6 address in brackets is written [fd00::1] "
                             f"or, with a port, [fd00::1]:8002")
        return host, _port(rest[1:], entry) if rest else None
    if entry.count(":") == 1:
        host, _, port = entry.partition(":")
        return host, _port(port, entry)
    return entry, None


def _port(text: str, entry: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"no_proxy entry {entry!r}: the port must be a number from 1 to 65535, found {text!r}")
    return int(text)


def relay_proxies(
    relays: Iterable[RelayEndpoint],
    proxy_setting: str | None,
    no_proxy_setting: str | None,
    environ: Mapping[str, str],
) -> dict[str, HttpProxy | None]:
    """For each relay (by name) the proxy to dial it through, or None to dial it directly.

    ``proxy_setting`` and ``no_proxy_setting`` are site.yaml's; without ``proxy_setting`` both
    come from ``environ``. Raises :class:`SettingsError` naming the setting or variable at fault.
    """
    if proxy_setting:
        url, url_source = proxy_setting, "site.yaml 'proxy'"
        skip, skip_source = no_proxy_setting or "", "site.yaml 'no_proxy'"
    else:
        url_source, url = _variable(environ, "https_proxy", "HTTPS_PROXY")
        skip_source, skip = _variable(environ, "no_proxy", "NO_PROXY")
    relays = list(relays)
    if not url:
        return {relay.name: None for relay in relays}
    try:
        proxy = HttpProxy.from_url(url)
    except ValueError as exc:
        raise SettingsError(f"{url_source}: {exc}") from None
    try:
        direct = NoProxy.parse(skip)
    except ValueError as exc:
        raise SettingsError(f"{skip_source}: {exc}") from None
    return {relay.name: None if direct.matches(relay.host, relay.port) else proxy for relay in relays}


def _variable(environ: Mapping[str, str], lower: str, upper: str) -> tuple[str, str]:
    """(where it came from, its value): the lower-case name first, as curl and requests read them."""
    for name in (lower, upper):
        if environ.get(name, "").strip():
            return f"environment variable {name}", environ[name].strip()
    return f"environment variable {lower}", ""


def route(proxy: HttpProxy | None) -> str:
    """How a relay is dialled, for the logs: ``through proxy host:port`` or ``directly``."""
    return f"through proxy {proxy.describe()}" if proxy else "directly"
