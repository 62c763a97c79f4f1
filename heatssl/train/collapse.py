"""A collapsed EMA teacher, caught while it trains instead of by a probe at chance afterwards.

Latent targets have a trivial solution: an encoder that gives every image the same features predicts
its teacher perfectly. :func:`heatssl.model.teacher.feature_spread` measures how much the teacher's
standardised targets differ between the images of a batch (0 when they are all the same, ~0.1 to 1
for a healthy encoder). :class:`CollapseWatch` reads it every few steps (where the non-finite flag is
read, so no extra host sync) and stops the run when it has stayed below ``loss.collapse_spread``
for ``patience`` reads in a row.
"""

from __future__ import annotations

from heatssl.errors import CollapseError


class CollapseWatch:
    """Stop a run whose teacher spread stays below ``threshold`` (0: never) for ``patience`` reads."""

    def __init__(self, threshold: float, patience: int = 3) -> None:
        self.threshold, self.patience = threshold, max(1, patience)
        self.low = 0  # reads in a row below the threshold
        self.first_low: int | None = None  # the step of the first of them

    def note(self, spread: float, step: int) -> None:
        """Take one read of the spread at optimiser step ``step``; raise :class:`CollapseError`
        on the ``patience``-th low read in a row (a healthy read resets the count)."""
        if not self.threshold > 0:
            return
        if spread >= self.threshold:
            self.low, self.first_low = 0, None
            return
        self.low += 1
        self.first_low = step if self.first_low is None else self.first_low
        if self.low >= self.patience:
            raise CollapseError(
                f"the EMA teacher collapsed: the spread of its targets over a batch stayed below "
                f"loss.collapse_spread={self.threshold:g} for {self.low} reads in a row, from step "
                f"{self.first_low} (last {spread:.2g} at step {step}; a healthy encoder gives about "
                f"0.1 to 1): every image gets nearly the same features, so the probes would score "
                f"about chance. Fix: keep the pixel loss (loss.target=both with loss.pixel_weight "
                f"> 0), start the teacher's momentum higher (loss.teacher_momentum, e.g. 0.999), or "
                f"lower optim.base_lr; loss.collapse_spread=0 turns this check off."
            )
