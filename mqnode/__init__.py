"""mqnode: a Raft-replicated outbound mail queue node."""

__version__ = "0.1.0"
