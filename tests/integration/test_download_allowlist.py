"""
Hostile file links: downloads go only where the connection's files come from.

Every test here runs under a resolver stub and a connection guard (:func:`network`): test host
names resolve to the addresses a test gives them (a metadata or private address included), and
any connection to an address outside 127.0.0.0/8 is refused by the guard *and* recorded, so a
test fails if one is merely attempted. No traffic leaves loopback.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import logging
import socket
import ssl
import threading
import traceback
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from airflow.sdk.exceptions import AirflowFailException

from imagecb_provider.exceptions import (
    ImageCbConnectionError,
    ImageCbError,
    ImageCbLinkExpired,
    InvalidRemoteTaskId,
)
from imagecb_provider.hooks.imagecb import ImageCbHook
from imagecb_provider.hooks.protocol import RetryPolicy
from imagecb_provider.models import GenerationRequest

pytestmark = pytest.mark.timeout(60)

CONN_ENV = "AIRFLOW_CONN_IMAGECB_DEFAULT"
JPEG = b"\xff\xd8\xff\xe0" + bytes(200) + b"\xff\xd9"
SECRET = "SECRET-7c1d"
LOOPBACK = ipaddress.ip_network("127.0.0.0/8")


# ------------------------------------------------------------------------- the network
class Network:
    """The resolver stub's names, and what the guard saw."""

    def __init__(self) -> None:
        self.names: dict[str, list[str]] = {}
        self.lookups: list[str] = []
        self.connected: list[str] = []
        self.blocked: list[str] = []

    def resolve(self, name: str, *addresses: str) -> None:
        self.names[name] = list(addresses)


@pytest.fixture(autouse=True)
def network(monkeypatch) -> Iterator[Network]:
    """Resolve test names by the stub only (never by real DNS); refuse and record non-loopback connects."""
    net = Network()
    real_getaddrinfo = socket.getaddrinfo
    real_connect = socket.socket.connect
    real_connect_ex = socket.socket.connect_ex

    def getaddrinfo(host, port, family=0, type=0, proto=0, flags=0):
        name = host.decode() if isinstance(host, bytes) else str(host)
        net.lookups.append(name)
        number = int(port) if port not in (None, "") else 0
        if name in net.names:
            return [
                (socket.AF_INET6, socket.SOCK_STREAM, 6, "", (a, number, 0, 0))
                if ":" in a
                else (socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, number))
                for a in net.names[name]
            ]
        try:
            ipaddress.ip_address(name.split("%")[0])
        except ValueError:
            if name != "localhost":
                raise socket.gaierror(socket.EAI_NONAME, f"{name} is not resolvable in these tests") from None
        return real_getaddrinfo(host, port, family, type, proto, flags)

    def check(sock: socket.socket, address) -> None:
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            return
        ip = ipaddress.ip_address(str(address[0]).split("%")[0])
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if not (isinstance(ip, ipaddress.IPv4Address) and ip in LOOPBACK):
            net.blocked.append(str(address[0]))
            raise OSError(errno.ENETUNREACH, f"test guard: no connection to {address[0]}")
        net.connected.append(str(ip))

    def connect(sock, address):
        check(sock, address)
        return real_connect(sock, address)

    def connect_ex(sock, address):
        check(sock, address)
        return real_connect_ex(sock, address)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    yield net
    assert net.blocked == [], f"a connection outside loopback was attempted: {net.blocked}"


# ---------------------------------------------------------------------------- servers
class Server:
    """A loopback HTTP(S) server of canned answers per path; records each request (path, Host)."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.routes: dict[str, list[tuple[int, dict[str, str], bytes]]] = {}
        self.hits: list[tuple[str, str]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                server.hits.append((self.path, self.headers.get("Host", "")))
                answers = server.routes.get(self.path.partition("?")[0]) or [(404, {}, b"no such file")]
                status, headers, body = answers.pop(0) if len(answers) > 1 else answers[0]
                self.send_response(status)
                for name, value in {"Content-Length": str(len(body)), **headers}.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _answer

            def log_message(self, *args) -> None:
                pass

        self._http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if tls is not None:
            self._http.socket = tls.wrap_socket(self._http.socket, server_side=True)
        self.port = self._http.server_port
        threading.Thread(target=self._http.serve_forever, daemon=True).start()

    def route(self, path: str, *answers: tuple[int, dict[str, str], bytes]) -> None:
        """Answer ``path`` with each of ``answers`` in turn, the last one from then on."""
        self.routes[path] = list(answers)

    def image(self, path: str, body: bytes = JPEG) -> None:
        self.route(path, (200, {"Content-Type": "image/jpeg"}, body))

    def redirect(self, path: str, location: str, status: int = 302) -> None:
        self.route(path, (status, {"Location": location}, b""))

    def paths(self) -> list[str]:
        return [path for path, _ in self.hits]

    def stop(self) -> None:
        self._http.shutdown()
        self._http.server_close()


@pytest.fixture
def serve() -> Iterator[Callable[..., Server]]:
    servers: list[Server] = []

    def start(tls: ssl.SSLContext | None = None) -> Server:
        servers.append(Server(tls))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def waits() -> list[float]:
    return []


@pytest.fixture
def connect(monkeypatch, waits) -> Callable[..., ImageCbHook]:
    """Point ``imagecb_default`` at ``host`` (empty: the vendor's API) with ``file_hosts``; return a hook."""

    def make(host: str = "", file_hosts: list[str] | str | None = None) -> ImageCbHook:
        extra = {} if file_hosts is None else {"file_hosts": file_hosts}
        monkeypatch.setenv(
            CONN_ENV, json.dumps({"conn_type": "imagecb", "host": host, "password": "k", "extra": extra})
        )
        return ImageCbHook(retry_policy=RetryPolicy(max_attempts=3, sleep=waits.append))

    return make


def refused(call: Callable[[], object]) -> ImageCbError:
    """Run ``call``, which must be refused at once: a permanent ImageCb error, never retried."""
    with pytest.raises(ImageCbError) as info:
        call()
    assert isinstance(info.value, AirflowFailException), f"not a permanent refusal: {info.value!r}"
    return info.value


# ------------------------------------------------------------------------ redirects
@pytest.mark.parametrize("metadata_host", ["127.0.0.1", "localhost"])
def test_a_redirect_to_a_loopback_metadata_path_is_refused(network, serve, connect, waits, metadata_host):
    files = serve()
    network.resolve("files.test", "127.0.0.1")
    files.redirect("/x.jpg", f"http://{metadata_host}:{files.port}/latest/meta-data/iam/credentials")
    files.route("/latest/meta-data/iam/credentials", (200, {}, b'{"SecretAccessKey": "stolen"}'))
    hook = connect("http://api.test:8089", file_hosts=["http://files.test"])
    error = refused(lambda: hook.fetch_file(f"http://files.test:{files.port}/x.jpg?sig={SECRET}"))
    text = str(error)
    assert f"{metadata_host} is not a file host of connection 'imagecb_default'" in text
    assert "add it to the file_hosts extra" in text
    assert f"a redirect from http://files.test:{files.port}/x.jpg" in text
    assert SECRET not in text
    assert files.paths() == [f"/x.jpg?sig={SECRET}"]  # the metadata path was never asked for
    assert waits == []


def test_a_redirect_chain_to_a_private_address_is_refused_before_connecting(network, serve, connect):
    files = serve()
    network.resolve("files.test", "127.0.0.1")
    network.resolve("edge.cdn.test", "10.20.30.40")
    files.redirect("/a.jpg", "/b.jpg")
    files.redirect("/b.jpg", f"http://edge.cdn.test:{files.port}/c.jpg", status=307)
    hook = connect("http://api.test:8089", file_hosts="http://files.test, http://*.cdn.test")
    error = refused(lambda: hook.fetch_file(f"http://files.test:{files.port}/a.jpg"))
    assert "edge.cdn.test resolves to 10.20.30.40, a private address" in str(error)
    assert f"a redirect from http://files.test:{files.port}/b.jpg" in str(error)
    assert files.paths() == ["/a.jpg", "/b.jpg"]
    assert network.blocked == []


def test_redirects_are_followed_at_most_five_times(network, serve, connect):
    files = serve()
    network.resolve("files.test", "127.0.0.1")
    files.redirect("/loop.jpg", "/loop.jpg?again=1")
    hook = connect("http://api.test:8089", file_hosts=["http://files.test"])
    error = refused(lambda: hook.fetch_file(f"http://files.test:{files.port}/loop.jpg"))
    assert "more than 5 redirects" in str(error)
    assert len(files.hits) == 6


def test_an_allowed_redirect_is_followed_and_each_hop_resolved_once(network, serve, connect):
    """A redirect between allowed hosts works; the address checked is the address connected to."""
    files = serve()
    network.resolve("files.test", "127.0.0.1")
    network.resolve("mirror.test", "127.0.0.1")
    files.redirect("/x.jpg", f"http://mirror.test:{files.port}/y.jpg", status=301)
    files.image("/y.jpg")
    hook = connect("http://api.test:8089", file_hosts=["http://files.test", "http://mirror.test"])
    body, content_type = hook.fetch_file(f"http://files.test:{files.port}/x.jpg")
    assert (body, content_type) == (JPEG, "image/jpeg")
    assert [host for _, host in files.hits] == [f"files.test:{files.port}", f"mirror.test:{files.port}"]
    assert [n for n in network.lookups if n.endswith(".test")] == ["files.test", "mirror.test"]
    assert network.connected == ["127.0.0.1", "127.0.0.1"]


def test_the_address_checked_is_the_address_connected_to(network, serve, connect, monkeypatch):
    """DNS rebinding: an answer that changes after the check is never used."""
    files = serve()
    files.image("/x.jpg")
    answers = iter([["127.0.0.1"], ["10.9.9.9"], ["10.9.9.9"]])
    stub = socket.getaddrinfo

    def rebinding(host, port, *args, **kwargs):
        if host == "files.test":
            network.resolve("files.test", *next(answers))
        return stub(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    hook = connect("http://api.test:8089", file_hosts=["http://files.test"])
    assert hook.fetch_file(f"http://files.test:{files.port}/x.jpg")[0] == JPEG
    assert network.lookups.count("files.test") == 1
    assert network.connected == ["127.0.0.1"]


# ----------------------------------------------------------------- schemes and hosts
def test_plain_http_is_refused_unless_the_host_is_allowed_over_http(network, serve, connect):
    files = serve()
    files.image("/x.jpg")
    network.resolve("tempfile.aiquickdraw.com", "127.0.0.1")
    link = f"http://tempfile.aiquickdraw.com:{files.port}/x.jpg"
    error = refused(lambda: connect().fetch_file(link))  # the vendor's API: https only
    assert "plain http is fetched only from a host allowed over http" in str(error)
    assert 'as "http://tempfile.aiquickdraw.com"' in str(error)
    # The same host over https passes the allow-list, but its address must be public.
    error = refused(lambda: connect().fetch_file(link.replace("http://", "https://")))
    assert "resolves to 127.0.0.1, a loopback address" in str(error)
    assert files.hits == []
    # Named exactly, with http://, it is the connection's own file server, wherever it is.
    assert connect(file_hosts=["http://tempfile.aiquickdraw.com"]).fetch_file(link)[0] == JPEG


def test_a_link_with_credentials_is_refused(network, serve, connect):
    api = serve()
    api.image("/files/x.jpg")
    network.resolve("api.test", "127.0.0.1")
    hook = connect(f"http://api.test:{api.port}")
    assert hook.fetch_file(f"http://api.test:{api.port}/files/x.jpg")[0] == JPEG  # its own host
    error = refused(lambda: hook.fetch_file(f"http://admin:hunter2@api.test:{api.port}/files/x.jpg"))
    assert "never carries credentials" in str(error)
    assert "hunter2" not in str(error)
    assert api.paths() == ["/files/x.jpg"]


@pytest.mark.parametrize(
    "link",
    [
        "file:///etc/passwd",
        "ftp://api.test/files/x.jpg",
        "gopher://127.0.0.1:6379/_INFO",
        "data:image/jpeg;base64,/9j/4AAQ",
        "//api.test/files/x.jpg",
        "http:///files/x.jpg",
    ],
)
def test_links_of_other_schemes_or_without_a_host_are_refused(network, connect, waits, link):
    error = refused(lambda: connect("http://api.test:8089").fetch_file(link))
    assert str(error).startswith("Refused to download")
    assert waits == []
    assert network.connected == []


def test_a_host_not_allowed_is_refused_naming_the_fix(network, serve, connect):
    files = serve()
    files.image("/x.jpg")
    network.resolve("elsewhere.test", "127.0.0.1")
    hook = connect("http://api.test:8089", file_hosts=["cdn.example.com"])
    error = refused(
        lambda: hook.fetch_file(f"https://elsewhere.test:{files.port}/x.jpg?X-Amz-Signature={SECRET}")
    )
    assert str(error) == (
        f"Refused to download https://elsewhere.test:{files.port}/x.jpg: elsewhere.test is not a file host "
        "of connection 'imagecb_default' (allowed: http://api.test, https://cdn.example.com); if "
        "elsewhere.test serves this connection's files, add it to the file_hosts extra of connection "
        "'imagecb_default'"
    )
    assert network.lookups.count("elsewhere.test") == 0  # refused before it is even resolved
    assert files.hits == []


# ----------------------------------------------------------------- resolved addresses
@pytest.mark.parametrize(
    ("addresses", "kind"),
    [
        (["169.254.169.254"], "link-local"),
        (["::ffff:169.254.169.254"], "link-local"),
        (["64:ff9b::a9fe:a9fe"], "link-local"),  # NAT64 of 169.254.169.254
        (["2002:a9fe:a9fe::1"], "link-local"),  # 6to4 of 169.254.169.254
        (["fe80::1"], "link-local"),
        (["10.0.0.8"], "private"),
        (["172.16.5.4"], "private"),
        (["192.168.1.20"], "private"),
        (["fd00::5"], "private"),
        (["127.0.0.1"], "loopback"),
        (["::1"], "loopback"),
        (["::127.0.0.1"], "loopback"),
        (["0.0.0.0"], "unspecified"),
        (["224.0.0.251"], "multicast"),
        (["240.0.0.1"], "reserved"),
        (["100.64.1.1"], "non-public"),
        (["93.184.215.14", "10.1.2.3"], "private"),  # one bad address is enough
    ],
)
def test_a_vendor_host_resolving_to_a_non_public_address_is_refused(network, connect, waits, addresses, kind):
    network.resolve("evil.r2.cloudflarestorage.com", *addresses)
    error = refused(lambda: connect().fetch_file("https://evil.r2.cloudflarestorage.com/latest/meta-data/"))
    assert f"a {kind} address" in str(error)
    assert "only a host named exactly in the file_hosts extra" in str(error)
    assert network.connected == []
    assert waits == []


# ------------------------------------------------------------------------- https
def _tls(tmp_path, names: list[str]) -> tuple[ssl.SSLContext, str]:
    """A server context with a certificate for ``names``, and the file of the CA that signed it."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.now(UTC)

    def build(subject: str, issuer: x509.Name, key, signer, *, ca: bool) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(issuer)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()), critical=False
            )
        )
        if ca:
            usage = x509.KeyUsage(True, False, False, False, False, True, True, False, False)
            builder = builder.add_extension(usage, critical=True)
        else:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False
            ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        return builder.sign(signer, hashes.SHA256())

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "imagecb test CA")])
    ca = build("imagecb test CA", ca_name, ca_key, ca_key, ca=True)
    leaf = build(names[0], ca_name, key, ca_key, ca=False)
    pem = serialization.Encoding.PEM
    (tmp_path / "ca.pem").write_bytes(ca.public_bytes(pem))
    (tmp_path / "leaf.pem").write_bytes(leaf.public_bytes(pem))
    (tmp_path / "leaf.key").write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "leaf.pem", tmp_path / "leaf.key")
    return context, str(tmp_path / "ca.pem")


def test_https_connects_to_the_checked_address_and_verifies_the_links_host(
    network, serve, connect, monkeypatch, tmp_path
):
    context, ca_file = _tls(tmp_path, ["files.test"])
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", ca_file)
    files = serve(tls=context)
    files.image("/x.jpg")
    network.resolve("files.test", "127.0.0.1")
    network.resolve("other.test", "127.0.0.1")
    hook = connect("http://api.test:8089", file_hosts="files.test, other.test")
    assert hook.fetch_file(f"https://files.test:{files.port}/x.jpg")[0] == JPEG
    assert files.hits == [("/x.jpg", f"files.test:{files.port}")]
    # Same address, another name: the certificate is checked against the link's host, not the address.
    with pytest.raises(ImageCbConnectionError, match=r"hostname 'other\.test' doesn't match 'files\.test'"):
        hook.fetch_file(f"https://other.test:{files.port}/x.jpg")
    assert len(files.hits) == 1


# --------------------------------------------------------------------- query strings
def test_failed_downloads_never_show_the_links_query(network, serve, connect, waits, caplog):
    caplog.set_level(logging.DEBUG)
    files = serve()
    network.resolve("files.test", "127.0.0.1")
    files.route("/x.jpg", (500, {}, b"boom"), (404, {}, b"gone"))
    files.route("/cut.jpg", (200, {"Content-Length": "5000", "Connection": "close"}, JPEG))
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    hook = connect("http://api.test:8089", file_hosts=["http://files.test"])
    query = f"X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Signature={SECRET}&X-Amz-Credential=AKIA%2F{SECRET}"
    errors: list[BaseException] = []
    for path, error_type in [
        (f"http://files.test:{files.port}/x.jpg", ImageCbLinkExpired),  # 500, retried, then 404
        (f"http://files.test:{closed}/x.jpg", ImageCbConnectionError),  # refused, retried to the end
        (f"http://files.test:{files.port}/cut.jpg", ImageCbConnectionError),  # cut off mid-body
    ]:
        with pytest.raises(error_type) as info:
            hook.fetch_file(f"{path}?{query}")
        errors.append(info.value)
    assert len(waits) == 1 + 2 + 2
    assert any("retrying in" in record.getMessage() for record in caplog.records)
    for error in errors:
        shown = "".join(traceback.format_exception(error)) + repr(error.args)
        assert SECRET not in shown
        assert "X-Amz" not in shown
    assert SECRET not in caplog.text


def test_the_archive_logs_no_signature_of_a_refreshed_link(imagecb_simulator, tmp_path, caplog):
    """An expired origin link is refreshed to a signed one, whose signature no log line holds."""
    import time

    from imagecb_provider.operators.archive import ImageArchiveOperator
    from imagecb_provider.operators.generate import ImageGenerateOperator

    imagecb_simulator.configure(origin_ttl=0.3)
    result = ImageGenerateOperator(task_id="g", prompt="a pear", deferrable=False, poll_interval=0.1).execute(
        {}
    )
    time.sleep(0.5)
    caplog.set_level(logging.DEBUG)
    archived = ImageArchiveOperator(task_id="a", results=result, destination=str(tmp_path)).execute({})
    assert {f["fetched_via"] for f in archived["files"]} == {"direct", "download_url"}
    assert "asking the API for a fresh link" in caplog.text
    assert "signature=" not in caplog.text


# ----------------------------------------------------------------- vendor answers
@pytest.mark.parametrize("task_id", ["../../etc/passwd", "task 1", "<img src=x>", "t" * 129, "task\n1"])
def test_a_hostile_task_id_in_a_submit_answer_is_refused(network, serve, connect, caplog, task_id):
    api = serve()
    network.resolve("api.test", "127.0.0.1")
    answer = json.dumps({"code": 200, "msg": "success", "data": {"taskId": task_id}}).encode()
    api.route("/api/v1/flux/kontext/generate", (200, {"Content-Type": "application/json"}, answer))
    caplog.set_level(logging.INFO)
    with pytest.raises(InvalidRemoteTaskId, match="the submit answer"):
        connect(f"http://api.test:{api.port}").submit(GenerationRequest(prompt="a gate"))
    assert "Submitted image task" not in caplog.text


# ------------------------------------------------------------------- asset callbacks
EVIL_JPEG = b"\xff\xd8\xff\xe0" + b"evil" * 50 + b"\xff\xd9"


def _forged_payload(remote_task_id: object, attacker: Server, outcome: str = "success") -> dict:
    """What an asset event holds for a callback body written by whoever holds the callback URL."""
    base = f"http://127.0.0.1:{attacker.port}"  # the simulator's own host: the allow-list lets it by
    return {
        "remote_task_id": remote_task_id,
        "label": "studio",
        "code": 200 if outcome == "success" else 400,
        "outcome": outcome,
        "message": "",
        "result_image_url": f"{base}/evil.jpg?X-Amz-Signature={SECRET}",
        "origin_image_url": f"{base}/evil-origin.jpg",
        "received_at": "2026-01-01T00:00:00Z",
        "signed": False,
        "callback_id": 1,
    }


@pytest.fixture
def attacker(serve) -> Server:
    server = serve()
    server.image("/evil.jpg", EVIL_JPEG)
    server.image("/evil-origin.jpg", EVIL_JPEG)
    return server


@pytest.mark.parametrize("claimed", ["success", "content_policy"])
def test_a_forged_asset_callback_is_archived_from_what_record_info_says(
    imagecb_simulator, attacker, tmp_path, claimed
):
    from imagecb_provider.operators.archive import ImageArchiveOperator
    from imagecb_provider.triggers.callback_event import result_from_event

    imagecb_simulator.configure(latency=0.0)
    hook = ImageCbHook()
    remote_id = hook.submit(GenerationRequest(prompt="a real lighthouse"))
    record = hook.get_task(remote_id)
    result = result_from_event(_forged_payload(remote_id, attacker, claimed))
    assert (result["task_id"], result["outcome"], result["via"]) == (remote_id, "success", "callback")
    assert (result["result_image_url"], result["origin_image_url"]) == (
        record.result_image_url,
        record.origin_image_url,
    )
    archived = ImageArchiveOperator(task_id="a", results=[result], destination=str(tmp_path)).execute({})
    assert sorted(f["source"] for f in archived[0]["files"]) == ["origin", "result"]
    assert attacker.hits == []
    kept = [(tmp_path / f["path"].rpartition("/")[2]).read_bytes() for f in archived[0]["files"]]
    assert EVIL_JPEG not in kept


@pytest.mark.parametrize("remote_task_id", ["task_forged_0001", "../../etc/passwd", None])
def test_a_forged_asset_callback_of_an_unknown_task_gives_no_result(
    imagecb_simulator, attacker, tmp_path, caplog, remote_task_id
):
    from imagecb_provider.operators.archive import ImageArchiveOperator
    from imagecb_provider.triggers.callback_event import result_from_event

    with caplog.at_level(logging.WARNING):
        result = result_from_event(_forged_payload(remote_task_id, attacker))
    assert result is None
    assert "Ignored" in caplog.text
    assert ImageArchiveOperator(task_id="a", results=[result], destination=str(tmp_path)).execute({}) == []
    assert attacker.hits == []


def test_an_asset_callback_of_a_task_still_generating_is_read_again_on_retry(imagecb_simulator, attacker):
    from imagecb_provider.triggers.callback_event import result_from_event

    remote_id = ImageCbHook().submit(GenerationRequest(prompt="a slow one [sim:never]"))
    with pytest.raises(ImageCbError, match=r"still reports remote task \w+ generating") as info:
        result_from_event(_forged_payload(remote_id, attacker))
    assert not isinstance(info.value, AirflowFailException)  # retryable: the task tries again later
    assert attacker.hits == []
