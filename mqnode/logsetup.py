"""One log set-up for the node and its SMTP worker processes.

Every delivery logs a line (as Postfix's `status=sent`), so a record's cost
counts: the format names no source file, thread or process, and the logging
HOWTO's optimizations turn off looking them up (`sys._getframe` walks for
the caller's file and line on every record otherwise).
"""

from __future__ import annotations

import logging


def configure(level: str, who: str) -> None:
    """Records as "<time> <who> <LEVEL> <logger>: <message>" on stderr, from `level` up."""
    logging._srcfile = None  # no caller lookup (the HOWTO's way)
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging.basicConfig(
        level=level.upper(), format=f"%(asctime)s {who} %(levelname)s %(name)s: %(message)s"
    )
    # aiosmtpd logs every SMTP command at INFO: far too much for a queue under load.
    logging.getLogger("mail.log").setLevel(max(logging.WARNING, logging.root.level))
