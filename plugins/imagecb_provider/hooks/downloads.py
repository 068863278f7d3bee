"""
Where generated files may be downloaded from, and the one download that obeys it.

A file link comes from outside: a record-info answer, a refreshed link, and, in the past, a
callback body. Whoever controls it must not make a worker fetch anything else: an internal
service, a cloud metadata address (``169.254.169.254``), a local file. So every download, and
every redirect hop of it, goes through :func:`download`:

* only ``https``, or plain ``http`` for a host the connection allows over ``http``; no other
  scheme, no credentials (``user:password@``) in the link;
* only a host the connection allows (:func:`allowed_file_hosts`): its own API host, the vendor's
  file hosts when it uses the vendor's API, and those listed in its ``file_hosts`` extra;
* the host is resolved once, and unless the connection names that exact host, every address must
  be public (not loopback, private, link-local, multicast, reserved or unspecified); the request
  then goes to the address that was checked, so a DNS answer that changes between the check and
  the connection (DNS rebinding) is never used;
* redirects are followed here, at most :data:`MAX_REDIRECTS`, each hop checked like the first.

A refused link raises :class:`ImageCbDownloadRefused` (permanent: never retried), naming the host
and the fix. No message built here holds a link's query string: pre-signed links carry their
signature there (see :func:`~imagecb_provider.hooks.protocol.without_query`).
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin, urlsplit

import certifi
from requests.utils import requote_uri
from urllib3 import BaseHTTPResponse
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.exceptions import ConnectTimeoutError, HTTPError
from urllib3.util.ssl_match_hostname import CertificateError

from imagecb_provider.exceptions import (
    ImageCbConnectionError,
    ImageCbCorruptFile,
    ImageCbDownloadRefused,
    ImageCbLinkExpired,
    ImageCbProtocolError,
)
from imagecb_provider.hooks.protocol import DEFAULT_BASE_URL, USER_AGENT, error_for, without_query

#: The vendor's file hosts, allowed when a connection uses the vendor's API (``https://api.kie.ai``).
#: From the vendor's reference (docs.kie.ai): generated files are served from
#: ``tempfile.aiquickdraw.com`` (the example file URL of "Get Download URL for Generated Files",
#: /common-api/download-url, and of the 4o Image "Get Direct Download URL" page), and the direct
#: download links that endpoint answers are pre-signed Cloudflare R2 links on
#: ``<account>.r2.cloudflarestorage.com`` (/4o-image-api/get-4-o-image-download-url). Both are
#: public hosts: their addresses are checked like any link's.
VENDOR_FILE_HOSTS = ("tempfile.aiquickdraw.com", "*.r2.cloudflarestorage.com")
MAX_REDIRECTS = 5
#: What an expired or foreign pre-signed link answers; anything else 4xx is a real error.
LINK_REFUSED_STATUSES = frozenset({401, 403, 404, 410})
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_DEFAULT_PORTS = {"http": 80, "https": 443}
_CHUNK = 256 * 1024
# Addresses that carry an IPv4 address inside an IPv6 one (NAT64 well-known prefix): the
# embedded address is what is finally reached, so it is what gets checked.
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


# ------------------------------------------------------------------------------ the allow-list
@dataclass(frozen=True)
class FileHost:
    """
    One host downloads may use, as written in ``file_hosts``: ``[http://|https://]host[:port]``.

    :param host: a lower-case host name or IP address; ``*.example.com`` is any subdomain of
        ``example.com`` (not ``example.com`` itself).
    :param port: only this port; ``None`` for any.
    :param plain_http: whether plain ``http`` is accepted (``https`` always is).
    :param vouched: whether the connection names this exact host, so that its addresses are not
        checked (a file server on a private network); wildcards and the vendor's hosts never are.
    """

    host: str
    port: int | None = None
    plain_http: bool = False
    vouched: bool = True

    @classmethod
    def parse(cls, entry: str, *, vouched: bool = True) -> FileHost:
        """Read one ``file_hosts`` entry; a bad one raises ``ValueError`` saying why."""
        text = entry.strip()
        if "://" not in text:
            text = f"https://{text}"
        parts = urlsplit(text)
        if parts.scheme not in _DEFAULT_PORTS:
            raise ValueError(f"{entry!r} is not an http:// or https:// host")
        if "@" in parts.netloc or parts.path.strip("/") or parts.query or parts.fragment:
            raise ValueError(f"{entry!r} must be a host, optionally with a scheme and a port, nothing more")
        host = _normal_host(parts.hostname or "")
        wildcard = host.startswith("*.")
        if not host or "*" in (host[2:] if wildcard else host):
            raise ValueError(f"{entry!r} has no valid host ('*.' may only start it)")
        try:
            port = parts.port
        except ValueError:
            raise ValueError(f"{entry!r} has an invalid port") from None
        return cls(host, port, plain_http=parts.scheme == "http", vouched=vouched and not wildcard)

    def matches(self, host: str, port: int) -> bool:
        if self.port is not None and port != self.port:
            return False
        if self.host.startswith("*."):
            return host.endswith(self.host[1:]) and len(host) > len(self.host) - 1
        return host == self.host

    def __str__(self) -> str:
        port = f":{self.port}" if self.port is not None else ""
        return f"{'http' if self.plain_http else 'https'}://{self.host}{port}"


def parse_file_hosts(value: Any) -> tuple[FileHost, ...]:
    """
    Read the ``file_hosts`` extra: a list of entries or one comma-separated string.

    :param value: the extra's value (``None`` or empty for none).
    """
    if value in (None, ""):
        return ()
    if isinstance(value, str):
        entries: Iterable[Any] = value.split(",")
    elif isinstance(value, list | tuple):
        entries = value
    else:
        raise ValueError("must be a list of hosts or a comma-separated string")
    hosts = []
    for entry in entries:
        if not isinstance(entry, str):
            raise ValueError(f"{entry!r} is not a string")
        if entry.strip():
            hosts.append(FileHost.parse(entry))
    return tuple(hosts)


def allowed_file_hosts(base_url: str, listed: Iterable[FileHost] = ()) -> tuple[FileHost, ...]:
    """
    Every host a connection downloads from: its own API host, the vendor's hosts, then ``listed``.

    The API host is allowed on any port, over ``https`` and, when the connection itself uses
    ``http`` (the simulator), over ``http``. The vendor's hosts (:data:`VENDOR_FILE_HOSTS`) are
    added only when the connection uses the vendor's API.

    :param base_url: the connection's API base URL.
    :param listed: the connection's ``file_hosts``.
    """
    hosts: list[FileHost] = []
    base = urlsplit(base_url)
    if base.scheme in _DEFAULT_PORTS and base.hostname:
        hosts.append(FileHost(_normal_host(base.hostname), plain_http=base.scheme == "http"))
    if base_url.rstrip("/") == DEFAULT_BASE_URL:
        hosts.extend(FileHost.parse(entry, vouched=False) for entry in VENDOR_FILE_HOSTS)
    hosts.extend(listed)
    return tuple(hosts)


# ---------------------------------------------------------------------------------- checking
@dataclass(frozen=True)
class _Target:
    """A link that passed every check: where to connect and what to ask for."""

    scheme: str
    host: str
    port: int
    addresses: tuple[str, ...]
    request_target: str
    shown: str

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == _DEFAULT_PORTS[self.scheme] else f"{host}:{self.port}"


def _normal_host(host: str) -> str:
    """Lower case, no trailing dot, IDNA: the one form hosts are compared in."""
    host = host.strip().rstrip(".").lower()
    try:
        return host.encode("idna").decode("ascii") if not host.isascii() else host
    except UnicodeError:
        return ""


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one leads to (mapped, 6to4, NAT64, IPv4-compatible), if any."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in _NAT64 or (int(ip) >> 32 == 0 and int(ip) > 0xFFFF):  # not "::" or "::1"
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def address_kind(address: str) -> str | None:
    """
    Why ``address`` is no place to download from (``"loopback"``, ``"private"``...), or ``None`` if public.

    An IPv6 address that leads to an IPv4 one (``::ffff:10.0.0.1``) is judged by the IPv4 address.

    :param address: an IPv4 or IPv6 address, as ``getaddrinfo`` gives it.
    """
    ip = ipaddress.ip_address(address.split("%")[0])
    embedded = _embedded_ipv4(ip) if isinstance(ip, ipaddress.IPv6Address) else None
    return _kind(embedded if embedded is not None else ip)


def _kind(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    for kind in ("unspecified", "loopback", "link_local", "multicast", "reserved", "private"):
        if getattr(ip, f"is_{kind}"):
            return kind.replace("_", "-")
    return None if ip.is_global else "non-public"


def _refuse(shown: str, reason: str, hop: str | None) -> ImageCbDownloadRefused:
    where = f" (a redirect from {hop})" if hop else ""
    return ImageCbDownloadRefused(f"Refused to download {shown}{where}: {reason}")


def _check(url: str, hosts: tuple[FileHost, ...], conn_id: str, hop: str | None) -> _Target:
    """Parse, allow-list and resolve one link, or raise :class:`ImageCbDownloadRefused`."""
    if any(ord(c) <= 0x20 or ord(c) == 0x7F for c in url):
        raise _refuse(repr(without_query(url)), "a link never holds spaces or control characters", hop)
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        shown = f"{scheme}:" if scheme else repr(without_query(url)[:60])
        raise _refuse(f"a {shown} link", "only https (or http for a host allowed over http) is fetched", hop)
    host = _normal_host(parts.hostname or "")
    if not host:
        raise _refuse(f"a {scheme} link without a host", "a file link names its host", hop)
    try:
        port = parts.port or _DEFAULT_PORTS[scheme]
    except ValueError:
        raise _refuse(f"a link to {host}", "its port is not a number from 0 to 65535", hop) from None
    # Built from the parts: never the query (pre-signed), never credentials.
    shown = f"{scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"
    if "@" in parts.netloc:
        raise _refuse(f"a link to {host}", "a file link never carries credentials (user:password@)", hop)
    fix = (
        f"if {host} serves this connection's files, add it to the file_hosts extra of connection {conn_id!r}"
    )
    matching = [h for h in hosts if h.matches(host, port)]
    if not matching:
        allowed = ", ".join(str(h) for h in hosts) or "none"
        raise _refuse(
            shown, f"{host} is not a file host of connection {conn_id!r} (allowed: {allowed}); {fix}", hop
        )
    # Only the entries that allow this scheme count, for the scheme and for vouching alike.
    matching = [h for h in matching if scheme == "https" or h.plain_http]
    if not matching:
        raise _refuse(
            shown,
            f"plain http is fetched only from a host allowed over http; use https, or {fix} "
            f'as "http://{host}"',
            hop,
        )
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as error:
        raise ImageCbConnectionError(f"Could not resolve {host} to download {shown}: {error}") from None
    addresses = tuple(dict.fromkeys(str(info[4][0]) for info in found))
    if not addresses:
        raise ImageCbConnectionError(f"Could not resolve {host} to download {shown}: no address")
    if not any(h.vouched for h in matching):
        # Every address, not just the first: the connection falls back to the next one, so a
        # name that mixes public and private answers is refused whole.
        for address in addresses:
            kind = address_kind(address)
            if kind is not None:
                raise _refuse(
                    shown,
                    f"{host} resolves to {address}, a {kind} address; only a host named exactly in the "
                    f"file_hosts extra of connection {conn_id!r} may, so if {host} is yours, add it there",
                    hop,
                )
    target = requote_uri((parts.path or "/") + (f"?{parts.query}" if parts.query else ""))
    return _Target(scheme, host, port, addresses, target, shown)


# --------------------------------------------------------------------------------- fetching
def _ca_bundle() -> str:
    # The same trust store requests uses, REQUESTS_CA_BUNDLE included.
    return os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or certifi.where()


def _connection(target: _Target, address: str, timeout: float) -> HTTPConnection:
    """A connection to the checked ``address`` that verifies TLS for the link's host name."""
    if target.scheme == "http":
        return HTTPConnection(address, target.port, timeout=timeout)
    return HTTPSConnection(
        address,
        target.port,
        timeout=timeout,
        cert_reqs="CERT_REQUIRED",
        ca_certs=_ca_bundle(),
        server_hostname=target.host,  # SNI, and the name the certificate must carry
        assert_hostname=target.host,
    )


def _get(target: _Target, timeout: float) -> tuple[HTTPConnection, BaseHTTPResponse]:
    """
    Send the GET to the first checked address that takes a connection; the caller closes it.

    A bare connection rather than a pool: a pool logs every request line, query and all, at DEBUG.
    """
    headers = {"Host": target.host_header, "User-Agent": USER_AGENT, "Accept": "*/*"}
    for position, address in enumerate(target.addresses):
        connection = _connection(target, address, timeout)
        try:
            connection.request("GET", target.request_target, headers=headers, preload_content=False)
            return connection, connection.getresponse()
        except ConnectTimeoutError:  # NewConnectionError (refused, unreachable) derives from it
            connection.close()
            if position == len(target.addresses) - 1:
                raise
        except BaseException:
            connection.close()
            raise
    raise AssertionError("unreachable")  # pragma: no cover


def download(
    url: str,
    hosts: tuple[FileHost, ...],
    *,
    conn_id: str,
    timeout: float,
    max_bytes: int,
) -> tuple[bytes, str]:
    """
    Download one file link, following redirects, each hop checked; returns its bytes and content type.

    One attempt: the caller retries :class:`~imagecb_provider.exceptions.ImageCbConnectionError`
    and 5xx. Sent without the API key and without any proxy from the environment (a proxy would
    resolve the host again, after the check).

    :param url: the file link.
    :param hosts: where the connection downloads from (:func:`allowed_file_hosts`).
    :param conn_id: the connection, named in a refusal.
    :param timeout: seconds to connect, and between two reads.
    :param max_bytes: refuse a larger file while it downloads.
    """
    hop: str | None = None
    for _ in range(MAX_REDIRECTS + 1):
        target = _check(url, hosts, conn_id, hop)
        connection: HTTPConnection | None = None
        try:
            connection, response = _get(target, timeout)
            if response.status in REDIRECT_STATUSES:
                location = response.headers.get("Location")
                if not location:
                    raise ImageCbProtocolError(
                        f"The link to {target.shown} answered HTTP {response.status} without a Location"
                    )
                url, hop = urljoin(url, location), target.shown
                continue
            return _body(target, response, max_bytes), response.headers.get("Content-Type", "")
        except (HTTPError, OSError, CertificateError) as error:
            # from None: the cause's text (urllib3's) may hold the query; this one never does.
            raise ImageCbConnectionError(_failure(target, error)) from None
        finally:
            if connection is not None:
                connection.close()
    raise ImageCbDownloadRefused(
        f"Refused to download {without_query(url)}: more than {MAX_REDIRECTS} redirects from the link "
        f"first given (the last from {hop})"
    )


def _body(target: _Target, response: BaseHTTPResponse, max_bytes: int) -> bytes:
    if response.status in LINK_REFUSED_STATUSES:
        raise ImageCbLinkExpired(f"The link to {target.shown} was refused (HTTP {response.status})")
    if response.status >= 400:
        raise error_for(response.status, response.reason or "", target.shown)
    declared = response.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise ImageCbCorruptFile(
            f"The file at {target.shown} exceeds {max_bytes} bytes ({declared} announced)"
        )
    body = bytearray()
    for chunk in response.stream(_CHUNK):
        body.extend(chunk)
        if len(body) > max_bytes:
            raise ImageCbCorruptFile(f"The file at {target.shown} exceeds {max_bytes} bytes")
    return bytes(body)


def _failure(target: _Target, error: BaseException) -> str:
    # urllib3's texts can name the request path with its query: the one helper strips it.
    return f"Could not download {target.shown}: {type(error).__name__}: {without_query(str(error))}"
