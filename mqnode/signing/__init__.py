"""Signing outgoing mail: DKIM keys (`keys`) and the signer at ingress (`dkim_signer`)."""
