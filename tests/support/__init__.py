"""Test support: the real-process `Cluster` helper and SMTP client helpers."""
