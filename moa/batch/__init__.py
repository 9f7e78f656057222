"""Offline batch: a file of chat completion requests through the MoA API, resumable, within a
budget (``moa batch run``, ``moa batch status``).

The public names: ``run_batch`` and ``BatchOptions`` (a run), ``batch_status`` (where it stands),
``read_items`` (the input's checks), and ``BatchRunner`` with its ``Sender`` seam for embedding.
"""

from moa.batch.items import BatchItem, InputError, read_items
from moa.batch.run import BatchOptions, run_batch
from moa.batch.runner import BatchRunner, BatchSummary, Reply, Sender
from moa.batch.status import BatchStatus, batch_status

__all__ = [
    "BatchItem",
    "BatchOptions",
    "BatchRunner",
    "BatchStatus",
    "BatchSummary",
    "InputError",
    "Reply",
    "Sender",
    "batch_status",
    "read_items",
    "run_batch",
]
