"""TLS contexts: the SMTP listeners' (server side) and the relay host's (client side).

`server_context`: the same context serves STARTTLS on `smtp_addr` (RFC 3207)
and implicit TLS on `smtps_addr` (RFC 8314). TLS 1.2 is the floor; client
certificates are not asked for.

`relay_client_context`: what delivery to a relay host with a login uses: the
relay's certificate must chain to `relay_tls_ca_file` (else the system's
CAs) and name the relay host as configured; TLS 1.2 is the floor.

`opportunistic_client_context`: delivery when TLS is not required (Postfix's
`may` level): no certificate check, every protocol version and cipher the
local OpenSSL still has (TLS 1.0 and 1.1 included, security level 0), because
the alternative to a weak handshake is plaintext. `required_client_context`:
mail for a domain that requires TLS: TLS 1.2 at least, and a certificate that
verifies and names the MX host (Postfix's `verify` level).

The files are read once, at start-up: replacing a certificate or CA file
means restarting the node (one node at a time).
"""

from __future__ import annotations

import ssl

from mqnode.errors import ConfigError


def server_context(
    cert_file: str, key_file: str, settings: str = "smtp_tls_cert/smtp_tls_key"
) -> ssl.SSLContext:
    """A server context for `cert_file` (PEM chain) and `key_file`; ConfigError (naming
    `settings`) if unusable."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_NONE  # submission clients authenticate with AUTH, not certs
    try:
        ctx.load_cert_chain(cert_file, key_file)
    except FileNotFoundError as exc:
        raise ConfigError(f"{settings}: no such file: {exc.filename}") from exc
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"{settings}: cannot load {cert_file} / {key_file}: {exc}") from exc
    return ctx


def relay_client_context(ca_file: str, setting: str = "relay_tls_ca_file") -> ssl.SSLContext:
    """A verifying client context: `ca_file` (PEM) as trust anchors, or the system's if "";
    TLS 1.2 at least. `setting` names the file's setting in a ConfigError."""
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file or None)
    except FileNotFoundError as exc:
        raise ConfigError(f"{setting}: no such file: {ca_file}") from exc
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"{setting}: cannot load {ca_file}: {exc}") from exc
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def opportunistic_client_context() -> ssl.SSLContext:
    """Postfix `may`: encrypt whenever the receiver can, however old its TLS."""
    ctx = _unverified_client(ssl.TLSVersion.MINIMUM_SUPPORTED)
    try:
        ctx.set_ciphers("ALL:@SECLEVEL=0")  # OpenSSL 3 refuses TLS 1.0/1.1 at level 1
    except ssl.SSLError:
        ctx.set_ciphers("ALL")
    return ctx


def required_client_context(ca_file: str = "") -> ssl.SSLContext:
    """Mail that requires TLS: TLS 1.2 at least, and a certificate that chains to `ca_file`
    (else the system's CAs) and names the host (tls_required_ca_file)."""
    return relay_client_context(ca_file, "tls_required_ca_file")


def _unverified_client(minimum: ssl.TLSVersion) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = minimum
    return ctx
