"""Delivery: the lease holder's claim -> deliver -> record loop.

`dispatcher` runs the loop under the `lease`; `routing` and `mx` say where a
domain's mail goes; `client` runs one SMTP transaction (aiosmtplib) and maps
replies to outcomes; `feedback` sizes each destination's concurrency; `retry`
says when a deferred message is tried again.
"""
