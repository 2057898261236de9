"""TLS for the SMTP listeners: one server-side `ssl.SSLContext` from a cert and key file.

The same context serves STARTTLS on `smtp_addr` (RFC 3207) and implicit TLS
on `smtps_addr` (RFC 8314). TLS 1.2 is the floor; client certificates are not
asked for. The files are read once, at start-up: replacing a certificate
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
