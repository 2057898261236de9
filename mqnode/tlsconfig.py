"""TLS contexts: the SMTP listeners' (server side) and the relay host's (client side).

`server_context`: the same context serves STARTTLS on `smtp_addr` (RFC 3207)
and implicit TLS on `smtps_addr` (RFC 8314). TLS 1.2 is the floor; client
certificates are not asked for.

`relay_client_context`: what delivery to a relay host with a login uses: the
relay's certificate must chain to `relay_tls_ca_file` (else the system's
CAs) and name the relay host as configured; TLS 1.2 is the floor.

The files are read once, at start-up: replacing a certificate or CA file
means restarting the node (one node at a time).
"""

from __future__ import annotations

import ssl

from .errors import ConfigError


def server_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    """A server context for `cert_file` (PEM chain) and `key_file`; ConfigError if unusable."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_NONE  # submission clients authenticate with AUTH, not certs
    try:
        ctx.load_cert_chain(cert_file, key_file)
    except FileNotFoundError as exc:
        raise ConfigError(f"smtp_tls_cert/smtp_tls_key: no such file: {exc.filename}") from exc
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"smtp_tls_cert/smtp_tls_key: cannot load {cert_file} / {key_file}: {exc}"
        ) from exc
    return ctx


def relay_client_context(ca_file: str) -> ssl.SSLContext:
    """A verifying client context: `ca_file` (PEM) as trust anchors, or the system's if ""."""
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file or None)
    except FileNotFoundError as exc:
        raise ConfigError(f"relay_tls_ca_file: no such file: {ca_file}") from exc
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"relay_tls_ca_file: cannot load {ca_file}: {exc}") from exc
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx
