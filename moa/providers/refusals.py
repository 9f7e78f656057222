"""Parameters a model refuses: those the config names, and those it refused with a 400 in this
process, dropped from every request to it before the request goes out."""

from __future__ import annotations

import logging

from moa.config import ProviderConfig
from moa.providers.transport import AttemptError, Transport
from moa.providers.wire import DROPPABLE, redact_key
from moa.types import CallRequest, ErrorKind

log = logging.getLogger("moa.providers")


class LearnedRefusals:
    """What each model of one provider refuses, configured or learned, and the request fitted to it."""

    def __init__(self, provider: str, cfg: ProviderConfig, transport: Transport, secret: str | None) -> None:
        self.provider, self.cfg, self.transport, self._secret = provider, cfg, transport, secret
        self.learned: dict[str, set[str]] = {}  # model -> parameters it refused with a 400

    def prepare(self, req: CallRequest) -> tuple[CallRequest, list[str]]:
        """The request as it will be sent: parameters the model refuses (configured, or learned
        from an earlier 400) dropped, then fitted to the API; with a note for each change."""
        p, notes = req.params, []
        configured = set(self.cfg.price(req.model).unsupported_params)
        learned = self.learned.get(req.model, set())
        drop: dict[str, None] = {}
        for name in DROPPABLE:
            if getattr(p, name) is None or (name not in configured and name not in learned):
                continue
            how = "per config" if name in configured else "learned from its 400"
            notes.append(f"{name} dropped: refused by {req.model} ({how})")
            drop[name] = None
        if drop:
            p = p.model_copy(update=drop)
        p, fitted = self.transport.adapt(req.model, p)
        notes += fitted
        return (req if p is req.params else req.model_copy(update={"params": p})), notes

    def learn(self, sent: CallRequest, err: AttemptError) -> bool:
        """Whether ``err`` is the model refusing a parameter this request sent: if so, remember it
        (it is dropped from every later request to this model) and say the call may go again."""
        if err.kind is not ErrorKind.BAD_REQUEST or err.status != 400:
            return False
        name = self.transport.refused_param(err.message)
        if name is None or getattr(sent.params, name) is None:
            return False
        self.learned.setdefault(sent.model, set()).add(name)
        log.warning(
            "%s refused %s; not sent to it again in this process (%s)",
            sent.model,
            name,
            redact_key(err.message, self._secret),
            extra={"event": "parameter_refused", "provider": self.provider, "model": sent.model},
        )
        return True
