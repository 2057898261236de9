"""Tools for demos, tests and benchmarks: the local demo cluster, the dev sink, loopback ports.

The node never imports these.
"""
