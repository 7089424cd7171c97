"""A principal header set by a trusted front (a mesh sidecar, an authenticating proxy), honoured
only on connections whose peer address is listed."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping

from proxy.auth.identity import AuthFailure, Identity
from proxy.config import TrustedHeaderConfig
from proxy.principal import canonical

_MAX_PEERS_CACHED = 4096


class TrustedHeader:
    def __init__(self, config: TrustedHeaderConfig) -> None:
        self.header = config.header
        self.groups_header = config.groups_header
        self.networks = tuple(ipaddress.ip_network(p, strict=False) for p in config.peers)
        # peer address text -> trusted: parsed once per peer, not once per request.
        self._peers: dict[str, bool] = {}

    def present(self, headers: Mapping[str, str]) -> bool:
        return self.header in headers

    def trusted(self, peer: str | None) -> bool:
        if peer is None:  # a Unix socket or a closed transport: no address to trust
            return False
        known = self._peers.get(peer)
        if known is None:
            try:
                address = ipaddress.ip_address(peer.split("%", 1)[0])
            except ValueError:
                return False
            if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
                address = address.ipv4_mapped  # ::ffff:10.0.0.1 is 10.0.0.1
            known = any(address in net for net in self.networks)
            if len(self._peers) >= _MAX_PEERS_CACHED:
                self._peers.clear()
            self._peers[peer] = known
        return known

    def authenticate(self, headers: Mapping[str, str], peer: str | None) -> Identity | AuthFailure:
        if not self.trusted(peer):
            return AuthFailure(
                "untrusted_peer",
                f"The {self.header} header is honoured only from trusted addresses.",
            )
        value = headers.get(self.header, "").strip()
        if not value:
            return AuthFailure("malformed", f"The {self.header} header is empty.")
        groups: tuple[str, ...] = ()
        if self.groups_header:
            raw = headers.get(self.groups_header, "")
            groups = tuple(canonical(g) for g in raw.replace(",", " ").split())
        return Identity(canonical(value), groups, f"peer:{peer}", "trusted_header")
