"""Node identities, the cluster key, and the certificates that authenticate every link.

Trust model (spec S1-S6 in specs/security.md):

- Each node has a persistent Ed25519 key pair (``identity.key`` in its data dir). Its node id
  is the first 16 bytes of SHA-256 over the raw 32-byte public key, in hex, so an id cannot
  be claimed without the private key.
- A cluster has a 32-byte secret, the cluster key, generated on a node's first start and
  given to the others (``--cluster-key`` / ``MESH_CLUSTER_KEY``). From it every holder
  derives the same Ed25519 certificate authority key (HKDF-SHA256, RFC 5869) and therefore
  the same self-signed CA certificate. Each node issues itself an X.509 certificate for its
  identity key, signed by that CA.
- Links run TLS 1.3 (RFC 8446) with mutual certificate authentication: a peer is accepted only
  when its certificate chains to the cluster CA (it holds the cluster key) and the key in it
  proves the node id it claims (it holds that node's private key). TLS brings fresh
  ephemeral keys per connection, so a recorded handshake cannot be replayed.

Everything here is built from the ``cryptography`` library; no primitive is our own. This
module does no I/O beyond reading and writing the key files.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import datetime
import hashlib
import logging
import os
import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.x509.oid import NameOID

from mesh.errors import AuthenticationError, ConfigError

IDENTITY_FILE = "identity.key"
CLUSTER_KEY_FILE = "cluster.key"
CLUSTER_KEY_BYTES = 32
CLUSTER_KEY_PREFIX = "mesh1-"
TLS_SERVER_NAME = "mesh-node"  # every node certificate carries it; nodes are told apart by key
_CA_INFO = b"mesh cluster certificate authority v1"
_DISCOVERY_INFO = b"mesh discovery announcements v1"
_CA_NOT_BEFORE = datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC)
_CA_NOT_AFTER = datetime.datetime(9999, 12, 31, tzinfo=datetime.UTC)
_CERT_LIFETIME = datetime.timedelta(days=3650)


def node_id_for(public_key: ed25519.Ed25519PublicKey) -> str:
    """The node id of an identity key: SHA-256 of the raw public key, first 16 bytes, hex."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).digest()[:16].hex()


def _write_private(path: Path, data: bytes) -> None:
    """Write a secret file readable by its owner only, atomically: a fresh temporary file
    (``mkstemp``: O_EXCL, mode 0600, never a symlink someone left there) renamed into place."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), 0o600)
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _check_private(path: Path) -> None:
    """Make a secret file owner-only again if its mode was loosened (and say so)."""
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        logging.getLogger(__name__).warning("%s was readable by others (mode %o); setting it to 600", path, mode)
        path.chmod(0o600)


def load_or_create_identity(data_dir: Path) -> ed25519.Ed25519PrivateKey:
    """This node's Ed25519 identity key from ``data_dir/identity.key`` (PKCS#8 PEM, mode 0600);
    created on first use.

    Raises ConfigError when the file cannot be written or is not an Ed25519 key.
    """
    path = data_dir / IDENTITY_FILE
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        if path.exists():
            _check_private(path)
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
            if not isinstance(key, ed25519.Ed25519PrivateKey):
                raise ConfigError(f"{path} is not an Ed25519 private key; delete it to make a new identity")
            return key
        key = ed25519.Ed25519PrivateKey.generate()
        _write_private(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        return key
    except ValueError as exc:
        raise ConfigError(f"{path} is corrupt ({exc}); delete it to make a new identity") from exc
    except OSError as exc:
        raise ConfigError(f"--data-dir {data_dir}: cannot store the identity key: {exc}") from exc


def format_cluster_key(key: bytes) -> str:
    """The text form of a cluster key: ``mesh1-`` + URL-safe base64 of its 32 bytes."""
    return CLUSTER_KEY_PREFIX + base64.urlsafe_b64encode(key).decode().rstrip("=")


def parse_cluster_key(text: str, *, flag: str = "--cluster-key") -> bytes:
    """Parse the text form of a cluster key (see ``format_cluster_key``).

    Raises ConfigError naming ``flag`` and the expected form.
    """
    text = text.strip()
    expected = f"expected {CLUSTER_KEY_PREFIX} followed by 43 URL-safe base64 characters, as printed by `python -m mesh key`"
    if not text.startswith(CLUSTER_KEY_PREFIX):
        raise ConfigError(f"{flag}: not a cluster key ({expected})")
    body = text[len(CLUSTER_KEY_PREFIX):]
    try:
        key = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    except (binascii.Error, ValueError):
        raise ConfigError(f"{flag}: not a cluster key ({expected})") from None
    if len(key) != CLUSTER_KEY_BYTES or format_cluster_key(key) != text:
        raise ConfigError(f"{flag}: not a cluster key ({expected})")
    return key


def load_or_create_cluster_key(data_dir: Path, given: str | None = None) -> bytes:
    """The cluster key: ``given`` (text form) when set, which is then stored; else the one
    stored in ``data_dir/cluster.key``; else a new random one, stored (mode 0600).

    Raises ConfigError for a malformed key or an unwritable data dir.
    """
    path = data_dir / CLUSTER_KEY_FILE
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        if given is not None:
            key = parse_cluster_key(given)
        elif path.exists():
            _check_private(path)
            return parse_cluster_key(path.read_text(), flag=str(path))
        else:
            key = os.urandom(CLUSTER_KEY_BYTES)
        if not path.exists() or path.read_text().strip() != format_cluster_key(key):
            _write_private(path, (format_cluster_key(key) + "\n").encode())
        return key
    except OSError as exc:
        raise ConfigError(f"--data-dir {data_dir}: cannot store the cluster key: {exc}") from exc


def _hkdf(secret: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)


def discovery_key(cluster_key: bytes) -> bytes:
    """A 32-byte key for authenticating discovery announcements, derived from the cluster key
    (HKDF-SHA256, RFC 5869) so the cluster key itself never signs anything public."""
    return _hkdf(cluster_key, _DISCOVERY_INFO)


def cluster_fingerprint(cluster_key: bytes) -> str:
    """A short public name of a cluster (8 hex digits of its CA key), safe to log."""
    ca_key = ed25519.Ed25519PrivateKey.from_private_bytes(_hkdf(cluster_key, _CA_INFO))
    return node_id_for(ca_key.public_key())[:8]


def _ca(cluster_key: bytes) -> tuple[ed25519.Ed25519PrivateKey, x509.Certificate]:
    """The cluster CA: identical key and certificate on every holder of the cluster key
    (Ed25519 signatures are deterministic, RFC 8032)."""
    key = ed25519.Ed25519PrivateKey.from_private_bytes(_hkdf(cluster_key, _CA_INFO))
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"mesh cluster {node_id_for(key.public_key())[:8]}")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(int.from_bytes(hashlib.sha256(name.public_bytes()).digest()[:16], "big") >> 1)
        .not_valid_before(_CA_NOT_BEFORE).not_valid_after(_CA_NOT_AFTER)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .sign(key, None)
    )
    return key, cert


def _node_certificate(identity: ed25519.Ed25519PrivateKey, ca_key: ed25519.Ed25519PrivateKey,
                      ca_cert: x509.Certificate, now: datetime.datetime) -> x509.Certificate:
    node_id = node_id_for(identity.public_key())
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node_id)]))
        .issuer_name(ca_cert.subject).public_key(identity.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + _CERT_LIFETIME)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(TLS_SERVER_NAME),
                                                    x509.DNSName(f"{node_id}.{TLS_SERVER_NAME}")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, None)
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class PeerIdentity:
    """Who is at the other end of an authenticated link."""

    node_id: str
    public_key: bytes  # raw Ed25519 public key, 32 bytes


class LinkSecurity:
    """What a transport needs to authenticate and encrypt links: this node's identity key, its
    certificate signed by the cluster CA, and the CA to check peers against.

    ``workdir`` receives the PEM files Python's ``ssl`` reads (key file mode 0600); without
    one they live in a temporary directory only while a context is built. QUIC (aioquic)
    takes the key and certificate objects and writes nothing.
    """

    def __init__(self, identity: ed25519.Ed25519PrivateKey, cluster_key: bytes, workdir: Path | None = None,
                 *, now: datetime.datetime | None = None) -> None:
        if len(cluster_key) != CLUSTER_KEY_BYTES:
            raise ConfigError(f"a cluster key is {CLUSTER_KEY_BYTES} bytes, got {len(cluster_key)}")
        self.identity = identity
        self.node_id = node_id_for(identity.public_key())
        self.cluster_fingerprint = cluster_fingerprint(cluster_key)
        self.discovery_key = discovery_key(cluster_key)
        ca_key, self.ca_certificate = _ca(cluster_key)
        self._ca_public_key = ca_key.public_key()
        self.certificate = _node_certificate(identity, ca_key, self.ca_certificate,
                                             now or datetime.datetime.now(datetime.UTC))
        self._workdir = workdir
        self._contexts: dict[bool, ssl.SSLContext] = {}

    def _pem_files(self, directory: Path) -> tuple[Path, Path]:
        """(certificate, key) PEM files in ``directory`` for Python's ``ssl``, which reads
        only files (the key file mode 0600)."""
        directory.mkdir(parents=True, exist_ok=True)
        cert_path, key_path = directory / "node.crt", directory / "node.key"
        _write_private(key_path, self.identity.private_bytes(serialization.Encoding.PEM,
                                                             serialization.PrivateFormat.PKCS8,
                                                             serialization.NoEncryption()))
        cert_path.write_bytes(self.certificate.public_bytes(serialization.Encoding.PEM))
        return cert_path, key_path

    @classmethod
    def for_data_dir(cls, data_dir: Path, cluster_key: str | None = None) -> LinkSecurity:
        """Identity and cluster key from ``data_dir`` (created on first use); ``cluster_key``
        (text form) overrides and replaces the stored one. Raises ConfigError."""
        return cls(load_or_create_identity(data_dir), load_or_create_cluster_key(data_dir, cluster_key),
                   data_dir / "tls")

    @property
    def ca_pem(self) -> bytes:
        return self.ca_certificate.public_bytes(serialization.Encoding.PEM)

    def ssl_context(self, *, server_side: bool) -> ssl.SSLContext:
        """A TLS 1.3-only context with mutual authentication against the cluster CA, built
        once per side and reused (building one costs about 0.6 ms).

        Host names are not checked: nodes are told apart by the key in their certificate,
        which ``verify_peer`` checks after the handshake. The server issues no session
        tickets (``num_tickets = 0``): no resumption, every link proves its key afresh.
        """
        cached = self._contexts.get(server_side)
        if cached is not None:
            return cached
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cadata=self.ca_pem.decode())
        if self._workdir is not None:
            ctx.load_cert_chain(*self._pem_files(self._workdir))
        else:  # no data dir: a private temporary directory, removed once the chain is loaded
            with tempfile.TemporaryDirectory(prefix="mesh-tls-") as tmp:
                ctx.load_cert_chain(*self._pem_files(Path(tmp)))
        if server_side:
            ctx.options |= ssl.OP_NO_TICKET
            ctx.num_tickets = 0
        self._contexts[server_side] = ctx
        return ctx

    def verify_peer(self, certificate: x509.Certificate | bytes | None) -> PeerIdentity:
        """Check a peer's certificate (DER bytes or parsed): signed by the cluster CA, valid
        now, an Ed25519 key. Returns the node identity the key proves.

        Raises AuthenticationError naming what failed.
        """
        if certificate is None:
            raise AuthenticationError("the peer presented no certificate")
        try:
            cert = certificate if isinstance(certificate, x509.Certificate) else x509.load_der_x509_certificate(certificate)
            if cert.issuer != self.ca_certificate.subject:
                raise AuthenticationError("the peer's certificate was not issued by this cluster (wrong cluster key)")
            self._ca_public_key.verify(cert.signature, cert.tbs_certificate_bytes)
            now = datetime.datetime.now(datetime.UTC)
            if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
                raise AuthenticationError("the peer's certificate is not valid at this time")
            key = cert.public_key()
        except InvalidSignature:
            raise AuthenticationError("the peer's certificate is not signed by this cluster's key") from None
        except ValueError as exc:
            raise AuthenticationError(f"the peer's certificate cannot be read: {exc}") from None
        if not isinstance(key, ed25519.Ed25519PublicKey):
            raise AuthenticationError("the peer's certificate does not hold an Ed25519 node key")
        return PeerIdentity(node_id=node_id_for(key), public_key=key.public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw))
