"""One step's ITL cap on batch-class work, for the scheduler. No torch.

``BatchCap(model, target, slowdown, chat)`` is created by ``Scheduler.schedule`` for each step
(when a calibrated ``StepCostModel`` and an ITL target are set), opened at the step's first
batch-class item with ``open(rest)``, asked ``limit(start, want, decode)`` for each batch-class
chunk, and told ``add(req, start, n)`` about everything scheduled. The rules are in the
scheduler's module docstring.
"""

from __future__ import annotations

from hpcserve.engine.request import PRIORITY_INTERACTIVE, Request, RequestStatus
from hpcserve.engine.step_cost import StepCostModel

NO_CHAT_STEP_TARGETS = 2.0  # no chat active: a step is bounded by this many ITL targets


class BatchCap:
    """One step's cap on batch-class work (priority > ``PRIORITY_INTERACTIVE``), in
    predicted seconds; see the module docstring. Created per step, opened at the
    step's first batch-class item (all interactive work is scheduled by then)."""

    def __init__(self, model: StepCostModel, target: float, slowdown: float, chat: bool) -> None:
        self.model, self.target, self.slowdown, self.chat = model, target, slowdown, chat
        self.tokens = self.context = 0  # the step so far
        self.batch_tokens = 0  # batch-class tokens scheduled so far
        self.res_tokens = self.res_context = 0  # batch decodes still to come (no-chat mode)
        self.cap: float | None = None
        self.hit = False
        self.decodes_exempt = True  # no-chat mode: every decode fits under the cap

    def open(self, rest: list[Request]) -> None:
        """``rest``: the running requests not served yet in this step (all batch-class)."""
        m = self.model
        if self.chat:
            base = m.predict(self.tokens, self.context) * (1 + self.slowdown) if self.tokens else self.target
            self.cap = min(self.target, base)
            return
        for r in rest:
            if r.status == RequestStatus.RUNNING and r.num_tokens - r.num_computed_tokens == 1:
                self.res_tokens += 1
                self.res_context += r.num_tokens
        decodes = m.predict(self.tokens + self.res_tokens, self.context + self.res_context)
        bound = max(NO_CHAT_STEP_TARGETS * self.target, 2 * m.predict(0, 0))  # never below two fixed step costs
        self.cap = min(decodes + self.target, bound)
        if decodes > self.cap:  # too many decodes for one bounded step: they take turns, oldest first
            self.res_tokens = self.res_context = 0
            self.decodes_exempt = False

    def limit(self, start: int, want: int, decode: bool) -> int:
        """How many of ``want`` tokens starting at ``start`` fit (0: skip this request)."""
        if decode and not self.chat and self.decodes_exempt:  # its time is part of the cap
            self.res_tokens = max(0, self.res_tokens - 1)
            self.res_context = max(0, self.res_context - start - 1)
            return want
        n = self.model.max_new_tokens(
            self.cap, self.tokens + self.res_tokens, self.context + self.res_context, start, want
        )
        if n == 0 and self.batch_tokens == 0 and self.res_tokens == 0:
            n = 1  # the floor: batch always progresses
        if n < want:
            self.hit = True
        return n

    def add(self, req: Request, start: int, n: int) -> None:
        self.tokens += n
        self.context += start + n
        if req.priority > PRIORITY_INTERACTIVE:
            self.batch_tokens += n
