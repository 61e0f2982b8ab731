"""Which destinations a run may reach through the bot's egress proxy: the address classifier and the policy."""

from __future__ import annotations

import ipaddress
import re
import socket
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str, int], list[IPAddress]]

DEFAULT_PORTS = frozenset({80, 443})
ANY_PORT = 0  # an entry's `:*`; port 0 is never a destination, so it cannot clash with a real one
ALLOW_HINT = "an administrator can allow it with CODEBUDDY_EGRESS_ALLOW"
DENY_HINT = "an administrator can remove it from CODEBUDDY_EGRESS_DENY"

_V4 = ipaddress.IPv4Network
_V6 = ipaddress.IPv6Network
# Checked in order, first match wins; the broadcast address before 240/4, which holds it.
_RANGES: tuple[tuple[IPNetwork, str], ...] = (
    (_V4("255.255.255.255/32"), "the broadcast address"),
    (_V4("0.0.0.0/8"), "a 'this network' address"),
    (_V4("127.0.0.0/8"), "a loopback address"),
    (_V4("10.0.0.0/8"), "a private address"),
    (_V4("172.16.0.0/12"), "a private address"),
    (_V4("192.168.0.0/16"), "a private address"),
    (_V4("169.254.0.0/16"), "a link-local address"),
    (_V4("100.64.0.0/10"), "a carrier-grade NAT (shared) address"),
    (_V4("192.0.0.0/24"), "a reserved (IETF protocol) address"),
    (_V4("192.0.2.0/24"), "a documentation address"),
    (_V4("198.51.100.0/24"), "a documentation address"),
    (_V4("203.0.113.0/24"), "a documentation address"),
    (_V4("192.88.99.0/24"), "a reserved (6to4 relay) address"),
    (_V4("198.18.0.0/15"), "a reserved (benchmarking) address"),
    (_V4("224.0.0.0/4"), "a multicast address"),
    (_V4("240.0.0.0/4"), "a reserved address"),
    (_V6("::/128"), "an unspecified ('this network') address"),
    (_V6("::1/128"), "a loopback address"),
    (_V6("fc00::/7"), "a private (unique local) address"),
    (_V6("fe80::/10"), "a link-local address"),
    (_V6("fec0::/10"), "a reserved (site-local) address"),
    (_V6("ff00::/8"), "a multicast address"),
    (_V6("2001:db8::/32"), "a documentation address"),
    (_V6("3fff::/20"), "a documentation address"),
    (_V6("2001::/23"), "a reserved (IETF protocol, Teredo) address"),
    (_V6("64:ff9b:1::/48"), "a reserved (local NAT64) address"),
    (_V6("100::/64"), "a reserved (discard) address"),
)
_LOOPBACK = (_V4("127.0.0.0/8"), _V6("::1/128"))
_GLOBAL_UNICAST_V6 = _V6("2000::/3")
_MAPPED = _V6("::ffff:0:0/96")
_COMPATIBLE = _V6("::/96")
_NAT64 = _V6("64:ff9b::/96")
_SIX_TO_FOUR = _V6("2002::/16")


def embedded_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries (IPv4-mapped, IPv4-compatible, NAT64, 6to4), else None."""
    if ip.version != 6 or int(ip) <= 1:  # :: and ::1 are themselves, not IPv4 0.0.0.0 and 0.0.0.1
        return None
    if ip in _MAPPED or ip in _COMPATIBLE or ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip in _SIX_TO_FOUR:
        return ip.sixtofour
    return None


def refusal_reason(ip: IPAddress, host_addresses: Iterable[IPAddress | IPNetwork] = ()) -> str | None:
    """Why `ip` is not a public unicast address (e.g. "10.0.0.5 is a private address"), or None when it is.

    `host_addresses` are this machine's own addresses or local networks (see `own_addresses`).
    """
    inner = embedded_ipv4(ip)
    shown = f"{ip} (IPv4 {inner})" if inner else str(ip)
    judged = inner or ip
    own = [ipaddress.ip_network(item) for item in host_addresses]
    for network, kind in _RANGES:
        if network in _LOOPBACK and judged in network:
            return f"{shown} is {kind}"
    if any(judged in network for network in own):
        return f"{shown} is one of this machine's own addresses"
    for network, kind in _RANGES:
        if judged.version == network.version and judged in network:
            return f"{shown} is {kind}"
    if judged.version == 6 and judged not in _GLOBAL_UNICAST_V6:
        return f"{shown} is a reserved address"
    if not judged.is_global:  # a safety net for ranges the table above does not name
        return f"{shown} is a reserved address"
    return None


def read_own_addresses(fib_trie: str = "/proc/net/fib_trie", if_inet6: str = "/proc/net/if_inet6") -> list[IPNetwork]:
    """This machine's own addresses: LOCAL entries of the IPv4 routing trie and every IPv6 interface address.

    The standard library has no getifaddrs; these two /proc files are what `ip addr` shows.
    """
    found: list[IPNetwork] = []
    try:
        with open(fib_trie, encoding="ascii") as handle:
            address = ""
            for line in handle:
                text = line.strip()
                if text.startswith("|--"):
                    address = text[3:].strip()
                elif address and text.startswith("/") and text.endswith("LOCAL"):
                    found.append(ipaddress.ip_network(f"{address}{text.split()[0]}", strict=False))
    except (OSError, ValueError):
        pass  # no /proc (or an odd one): the fixed ranges still refuse loopback and private addresses
    try:
        with open(if_inet6, encoding="ascii") as handle:
            for line in handle:
                if line.strip():
                    found.append(ipaddress.ip_network(ipaddress.IPv6Address(int(line.split()[0], 16))))
    except (OSError, ValueError):
        pass
    return sorted(set(found), key=lambda network: (network.version, network))


_own_cache: tuple[float, list[IPNetwork]] = (-1e9, [])


def own_addresses(max_age: float = 30.0) -> list[IPNetwork]:
    """`read_own_addresses`, re-read at most every `max_age` seconds (addresses change with DHCP, not per request)."""
    global _own_cache
    if time.monotonic() - _own_cache[0] > max_age:
        _own_cache = (time.monotonic(), read_own_addresses())
    return _own_cache[1]


def resolve_addresses(host: str, port: int) -> list[IPAddress]:
    """Every address `host` resolves to, in the resolver's order, each once (literals in any spelling included)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    seen: dict[IPAddress, None] = {}
    for _family, _type, _proto, _name, sockaddr in infos:
        seen.setdefault(ipaddress.ip_address(sockaddr[0].split("%", 1)[0]), None)
    return list(seen)


def normalize_host(host: str) -> str:
    """A host as rules compare it: lower case, no brackets around IPv6, no trailing dot."""
    return host.strip().strip("[]").rstrip(".").lower()


_NAME = re.compile(r"^(?=.{1,253}$)([a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?)(\.[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?)*$")


@dataclass(frozen=True)
class Rule:
    """One allow or deny entry: a host name, a `*.suffix`, or a network, with an optional port."""

    name: str = ""
    suffix: str = ""  # ".example.com" for "*.example.com": sub-domains only, not the apex
    network: IPNetwork | None = None
    port: int | None = None  # None: the entry named no port; ANY_PORT: `:*`

    def covers_port(self, port: int, unspecified: frozenset[int] | None) -> bool:
        """True if the rule's port matches; an entry without a port covers `unspecified` (None: every port)."""
        if self.port is None:
            return unspecified is None or port in unspecified
        return self.port in (ANY_PORT, port)

    def covers_name(self, host: str) -> bool:
        """True if the rule names `host` (normalized) by name or suffix."""
        return bool(self.name and host == self.name or self.suffix and host.endswith(self.suffix))


def parse_rule(entry: str, variable: str) -> Rule:
    """One entry of an allow or deny list: `host`, `host:port`, `*.suffix`, CIDR, IP, `[v6]:port`, port `*`."""
    bad = ValueError(f"{variable}: {entry!r} is not a host, host:port, *.suffix or CIDR network")
    text = entry.strip().lower()
    port_text = ""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest and not rest.startswith(":"):
            raise bad
        port_text = rest[1:]
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    else:
        host = text
    port: int | None = None
    if port_text == "*":
        port = ANY_PORT
    elif port_text:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise bad
        port = int(port_text)
    elif text.endswith(":"):
        raise bad
    host = host.rstrip(".")
    try:
        return Rule(network=ipaddress.ip_network(host, strict=False), port=port)
    except ValueError:
        pass
    if host.startswith("*.") and _NAME.match(host[2:]):
        return Rule(suffix=host[1:], port=port)
    if _NAME.match(host) and not host.replace(".", "").isdigit():
        return Rule(name=host, port=port)
    raise bad


def parse_rules(value: str, variable: str) -> tuple[Rule, ...]:
    """A comma-separated list of entries as a setting holds it; empty entries are skipped."""
    return tuple(parse_rule(entry, variable) for entry in value.split(",") if entry.strip())


def model_endpoint(base_url: str) -> tuple[str, int] | None:
    """(host, port) of the model API from CODEBUDDY_BASE_URL, with the scheme's default port; None when unset."""
    if not base_url.strip():
        return None
    try:
        parts = urlsplit(base_url.strip())
        port = parts.port or {"http": 80, "https": 443}[parts.scheme.lower()]
    except (KeyError, ValueError):
        raise ValueError(f"CODEBUDDY_BASE_URL: {base_url!r} is not an http:// or https:// URL") from None
    if not parts.hostname:
        raise ValueError(f"CODEBUDDY_BASE_URL: {base_url!r} names no host")
    return normalize_host(parts.hostname), port


@dataclass(frozen=True)
class Verdict:
    """The policy's answer for one destination: the addresses it may connect to, or why not (and who can help)."""

    addresses: tuple[IPAddress, ...] = ()
    reason: str = ""  # empty when allowed
    hint: str = ""

    @property
    def allowed(self) -> bool:
        """True if the destination may be reached, at `addresses`."""
        return not self.reason

    def message(self) -> str:
        """The one line a refused client reads."""
        return f"blocked by the bot's network policy: {self.reason}; {self.hint}"


@dataclass(frozen=True)
class EgressPolicy:
    """Which destinations a run may reach: `public` (public unicast addresses on ports 80 and 443) or `model`
    (the model endpoint only), widened by `allow` and narrowed by `deny`; the model endpoint is always allowed."""

    mode: str = "public"
    allow: tuple[Rule, ...] = ()
    deny: tuple[Rule, ...] = ()
    model: tuple[str, int] | None = None
    host_addresses: Callable[[], Iterable[IPAddress | IPNetwork]] = field(default=own_addresses, compare=False)

    @classmethod
    def from_settings(cls, mode: str = "", allow: str = "", deny: str = "", base_url: str = "") -> EgressPolicy:
        """The policy from setting strings (CODEBUDDY_EGRESS, _ALLOW, _DENY, CODEBUDDY_BASE_URL); ValueError names
        the variable of a bad value."""
        mode = mode.strip().lower() or "public"
        if mode not in ("public", "model"):
            raise ValueError(f"CODEBUDDY_EGRESS: {mode!r} is not public or model")
        return cls(mode=mode, allow=parse_rules(allow, "CODEBUDDY_EGRESS_ALLOW"),
                   deny=parse_rules(deny, "CODEBUDDY_EGRESS_DENY"), model=model_endpoint(base_url))

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> EgressPolicy:
        """`from_settings` over an environment mapping such as os.environ."""
        return cls.from_settings(env.get("CODEBUDDY_EGRESS", ""), env.get("CODEBUDDY_EGRESS_ALLOW", ""),
                                 env.get("CODEBUDDY_EGRESS_DENY", ""), env.get("CODEBUDDY_BASE_URL", ""))

    def check(self, host: str, port: int, resolve: Resolver = resolve_addresses) -> Verdict:
        """May a run reach `host:port`? Resolves the name only when it could be allowed (a refused name is not looked
        up, so DNS is no side channel) and judges every address; raises OSError when the name does not resolve."""
        host = normalize_host(host)
        if self.model == (host, port):
            return Verdict(tuple(resolve(host, port)))
        if any(rule.covers_name(host) and rule.covers_port(port, None) for rule in self.deny):
            return Verdict(reason=f"{host} is on the deny list", hint=DENY_HINT)
        if any(rule.covers_name(host) and rule.covers_port(port, DEFAULT_PORTS) for rule in self.allow):
            return Verdict(tuple(resolve(host, port)))
        networks = [rule for rule in self.allow if rule.network is not None and rule.covers_port(port, DEFAULT_PORTS)]
        public = self.mode == "public" and port in DEFAULT_PORTS
        if not public and not networks:
            if self.mode == "model":
                return Verdict(reason="only the model endpoint is allowed", hint=ALLOW_HINT)
            return Verdict(reason=f"port {port} is not allowed (only 80 and 443)", hint=ALLOW_HINT)
        addresses = tuple(resolve(host, port))
        if not addresses:
            raise OSError(f"{host} has no address")
        own = list(self.host_addresses())
        for ip in addresses:
            forms = {ip, embedded_ipv4(ip) or ip}  # a rule for 10.1.0.0/16 also meets ::ffff:10.1.2.3
            if any(form in rule.network for rule in self.deny for form in forms
                   if rule.network is not None and rule.covers_port(port, None)):
                return Verdict(reason=f"{host if host == str(ip) else f'{host}: {ip}'} is on the deny list",
                               hint=DENY_HINT)
            if any(form in rule.network for rule in networks for form in forms if rule.network is not None):
                continue
            if not public:
                reason = ("only the model endpoint is allowed" if self.mode == "model"
                          else f"port {port} is not allowed (only 80 and 443)")
                return Verdict(reason=reason, hint=ALLOW_HINT)
            why = refusal_reason(ip, own)
            if why:
                return Verdict(reason=why if host == str(ip) else f"{host}: {why}", hint=ALLOW_HINT)
        return Verdict(addresses)
