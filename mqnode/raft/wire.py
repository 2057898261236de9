"""Cheaper pickling of pysyncobj's peer messages, readable by any pysyncobj 0.3.17 node.

pysyncobj frames every message between nodes as
`encrypt(zlib.compress(pickle.dumps(message, protocol=2), 3))`. Protocol 2
pickles `bytes` as latin-1 text (decoded and re-encoded both ways, a binary
byte taking two), and every log entry is a bytes object: with protocol 2,
`pickle.dumps` was 9% of a leader's interpreter time under smtp-source load.
Protocol 5 writes bytes as they are; any Python 3.8+ unpickler reads it, so
nodes with and without this talk to each other.

Kept as it is: the zlib compression. Skipping it (a stored zlib stream, which
the receiver reads unchanged) saved ~45 us of deflate set-up per message, but
pysyncobj grows its socket buffers with `bytes +=` and slices them per
message, quadratic in what is pending: a follower catching up (thousands of
entries in one burst) stalled its node for seconds with 3-4x the bytes
(kill-leader rounds: 1 s outages became 3-6 s). Pacing (pacing.py) already
made messages fewer and larger, which is what the compression's fixed cost
is paid per.
"""

from __future__ import annotations

import pysyncobj.pickle as pysyncobj_pickle

# Fixed, not HIGHEST_PROTOCOL: a newer Python's highest could not be read by older ones.
PICKLE_PROTOCOL = 5


def install() -> None:
    """Make pysyncobj pickle with protocol 5 (see the module doc); idempotent."""
    # pysyncobj.pickle.dumps reads its module global `__protocol` at every call.
    setattr(pysyncobj_pickle, "__protocol", PICKLE_PROTOCOL)
