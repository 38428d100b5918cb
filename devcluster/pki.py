"""Certificates for the dev control plane, generated with `cryptography`.

A real API server refuses to run without TLS serving certs, a client CA and a service-account signing key;
generating them in-process (instead of shelling out to openssl/cfssl) keeps the cluster self-contained and
makes every identity explicit: the admin is `system:masters`, the controller manager authenticates as
`system:kube-controller-manager`, so bootstrap RBAC applies to it exactly as in a kubeadm cluster.
"""

from __future__ import annotations

import datetime as dt
import functools
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_VALIDITY = dt.timedelta(days=365)


@dataclass(frozen=True)
class CertPair:
    """Paths of a PEM certificate and its private key."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class Pki:
    """Every file the control plane components and clients need."""

    ca: CertPair
    apiserver: CertPair
    admin: CertPair
    controller_manager: CertPair
    kubelet_client: CertPair
    kubelet_serving: CertPair
    sa_key: Path
    sa_pub: Path


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def _name(common_name: str, org: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if org:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
    return x509.Name(attrs)


def _issue(
    *,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    subject: x509.Name,
    out: Path,
    stem: str,
    server: bool,
    dns: tuple[str, ...] = (),
    ips: tuple[str, ...] = (),
) -> CertPair:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_encipherment=True,
                content_commitment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
    )
    if dns or ips:
        sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    pair = CertPair(cert=out / f"{stem}.crt", key=out / f"{stem}.key")
    pair.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(pair.key, key)
    return pair


def _load_ca(out: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    ca_cert = x509.load_pem_x509_certificate((out / "ca.crt").read_bytes())
    ca_key = serialization.load_pem_private_key((out / "ca.key").read_bytes(), password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise TypeError(f"{out / 'ca.key'} is not the EC key this module writes")
    return ca_cert, ca_key


def issue_client(out: Path, *, stem: str, user: str, group: str | None = None) -> CertPair:
    """A client certificate for `user` (CN) in `group` (O), signed by the CA under `out`; reused if present."""
    pair = CertPair(cert=out / f"{stem}.crt", key=out / f"{stem}.key")
    if pair.cert.exists() and pair.key.exists():
        return pair
    ca_cert, ca_key = _load_ca(out)
    return _issue(ca_cert=ca_cert, ca_key=ca_key, subject=_name(user, group), out=out, stem=stem, server=False)


@dataclass(frozen=True)
class NodeCerts:
    """A kubelet's identities: its client certificate (Node authorizer) and its serving certificate."""

    client: CertPair
    serving: CertPair


def issue_node(out: Path, *, name: str, ip: str) -> NodeCerts:
    """Certificates of the kubelet of node `name` at `ip`, as kubeadm's TLS bootstrap would end up with.

    The client certificate is `system:node:<name>` in group `system:nodes`, so the API server's Node
    authorizer and NodeRestriction admission treat it as exactly that node; the serving certificate names
    the node's IP and hostname.
    """
    client = issue_client(out, stem=f"node-{name}-client", user=f"system:node:{name}", group="system:nodes")
    serving = CertPair(cert=out / f"node-{name}-serving.crt", key=out / f"node-{name}-serving.key")
    if not (serving.cert.exists() and serving.key.exists()):
        ca_cert, ca_key = _load_ca(out)
        serving = _issue(
            ca_cert=ca_cert,
            ca_key=ca_key,
            subject=_name(f"system:node:{name}", "system:nodes"),
            out=out,
            stem=f"node-{name}-serving",
            server=True,
            dns=(name, "localhost"),
            ips=(ip, "127.0.0.1"),
        )
    return NodeCerts(client=client, serving=serving)


def generate(out: Path, *, extra_ips: tuple[str, ...] = ()) -> Pki:
    """Create a CA and all leaf certificates under `out` (idempotent: existing material is reused)."""
    out.mkdir(parents=True, exist_ok=True)
    pki = Pki(
        ca=CertPair(out / "ca.crt", out / "ca.key"),
        apiserver=CertPair(out / "apiserver.crt", out / "apiserver.key"),
        admin=CertPair(out / "admin.crt", out / "admin.key"),
        controller_manager=CertPair(out / "kcm.crt", out / "kcm.key"),
        kubelet_client=CertPair(out / "kubelet-client.crt", out / "kubelet-client.key"),
        kubelet_serving=CertPair(out / "kubelet.crt", out / "kubelet.key"),
        sa_key=out / "sa.key",
        sa_pub=out / "sa.pub",
    )
    if pki.sa_pub.exists() and pki.kubelet_serving.key.exists():
        return pki

    ca_key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    ca_name = _name("finetune-devcluster-ca")
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_encipherment=False,
                content_commitment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    pki.ca.cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    _write_key(pki.ca.key, ca_key)

    issue = functools.partial(_issue, ca_cert=ca_cert, ca_key=ca_key, out=out)
    issue(
        subject=_name("kube-apiserver"),
        stem="apiserver",
        server=True,
        dns=(
            "localhost",
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
            "kubernetes.default.svc.cluster.local",
        ),
        ips=("127.0.0.1", "10.96.0.1", *extra_ips),
    )
    issue(subject=_name("admin", "system:masters"), stem="admin", server=False)
    issue(subject=_name("system:kube-controller-manager"), stem="kcm", server=False)
    issue(
        subject=_name("kube-apiserver-kubelet-client", "kubeadm:cluster-admins"),
        stem="kubelet-client",
        server=False,
    )
    issue(
        subject=_name("devcluster-node"),
        stem="kubelet",
        server=True,
        dns=("localhost",),
        ips=("127.0.0.1", *extra_ips),
    )
    sa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    _write_key(pki.sa_key, sa)
    pki.sa_pub.write_bytes(
        sa.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return pki
