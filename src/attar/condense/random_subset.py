"""``random``: a random real subset, ``ipc`` distinct images of every class (the baseline every method must beat)."""

from __future__ import annotations

from attar.condense.base import CondenseContext, CondenseOutput, Condenser, gen, register


@register("random")
class RandomSubset(Condenser):
    summary = "random real subset, ipc images per class"

    def run(self, ctx: CondenseContext) -> CondenseOutput:
        rows = ctx.index.draw(ctx.ipc, gen(ctx.seed, "random"))
        flat = rows.flatten()
        return CondenseOutput(ctx.x[flat].clone(), ctx.y[flat].clone(), extra={"rows": flat.tolist()})
