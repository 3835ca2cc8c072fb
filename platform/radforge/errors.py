"""The two kinds of failure radforge distinguishes.

`ConfigError` means the run cannot start (bad recipe key, unreachable SOURCE, missing
credentials, DEST not writable): the CLI prints its message on one line and exits 2 before any
work. Problems with individual inputs are never exceptions that escape a job: they become
ledger entries with a reason code (see `radforge.dicom.Reject`).

Messages must never contain DICOM header values (they may be PHI): name the file path or the
setting, never the value read from the file.
"""


class ConfigError(Exception):
    """Bad configuration, detected before any work; the message is one line for people."""
