"""Batches: a file of chat completion requests through the MoA API, resumable, within a budget.

The work of both ways to run one: ``moa batch run`` (``moa.cli.batch_run``, in this process or on
a service) and the service's OpenAI Batch API (``moa.api.batch_worker``, in the background).

The public names: ``batch_status`` (where a run stands), ``read_items`` and ``check_items`` (the
input's checks), and ``BatchRunner`` with its ``Sender`` seam for embedding.
"""

from moa.batch.items import BatchItem, InputError, check_items, read_items
from moa.batch.runner import BatchRunner, BatchSummary, Reply, Sender
from moa.batch.status import BatchStatus, batch_status

__all__ = [
    "BatchItem",
    "BatchRunner",
    "BatchStatus",
    "BatchSummary",
    "InputError",
    "Reply",
    "Sender",
    "batch_status",
    "check_items",
    "read_items",
]
