"""`attar methods [family] [name]`: every registered method, by family; one family's methods with a line each;
or one method's fields. The one listing verb: every family is a registry (attar.registry), so one command
describes them all."""

from __future__ import annotations

from typing import Any, Callable, Optional

import typer
from rich.markup import escape
from rich.table import Table

from attar.cli.app import app, out
from attar.console import errors_as_messages
from attar.errors import AttarError


def _families() -> dict[str, tuple[Any, Callable[[str], bool], str]]:
    """family -> (registry, which names it lists, how a recipe or command uses it)."""
    from attar.adapt import ADAPTERS
    from attar.condense import CONDENSERS
    from attar.distill.divergences import DIVERGENCES
    from attar.distill.objectives import OBJECTIVES
    from attar.merge.methods import MERGE_METHODS
    from attar.models import ARCHS, PRETRAINED
    from attar.select import SELECTORS
    from attar.stages import STAGES

    def tensor(n: str) -> bool:
        return MERGE_METHODS.get(n).level == "tensor"

    every = lambda n: True  # noqa: E731
    return {
        "stages": (STAGES, every, "recipe stages: `kind: NAME`, options under `NAME: {...}`"),
        "objectives": (OBJECTIVES, every, "train/distill stages: `objective: {name: NAME, ...}`"),
        "divergences": (DIVERGENCES, every, "KD objectives: `divergence: NAME` (its fields top-level)"),
        "architectures": (ARCHS, every, "`model: {arch: NAME, ...}`"),
        "pretrained": (PRETRAINED, every, "`model: {pretrained: NAME}` (teachers that install offline)"),
        "merge": (MERGE_METHODS, tensor, "`attar merge` and recipe merge stages: `method: NAME`"),
        "merge-data": (MERGE_METHODS, lambda n: not tensor(n),
                       "data-aware merges: recipe `merge` stages only (they score on held-out data)"),
        "condense": (CONDENSERS, every, "`attar condense --method NAME` and condense stages"),
        "adapters": (ADAPTERS, every, "`attar finetune run --adapter NAME` and finetune stages"),
        "selectors": (SELECTORS, every, "train/distill stages: `selector: {name: NAME, ...}`"),
    }


def _summary(obj: Any) -> str:
    text = getattr(obj, "summary", None) or (obj.__doc__ or "")
    return text.strip().splitlines()[0] if text.strip() else ""


def _fields(registry: Any, name: str) -> dict[str, dict[str, Any]]:
    obj = registry.get(name)
    if hasattr(obj, "options_model"):  # a stage kind: the fields of its `<kind>:` block
        from attar.registry import field_rows

        return field_rows(obj.options_model())
    return registry.fields(name)


@app.command()
@errors_as_messages
def methods(
    family: Optional[str] = typer.Argument(None, help="a family (objectives, merge, condense, adapters, ...)"),
    name: Optional[str] = typer.Argument(None, help="a method of that family: show its fields"),
):
    """List the registered methods by family, one family's methods, or one method's fields."""
    fams = _families()
    if family is None:
        for fam, (reg, keep, use) in fams.items():
            out.print(f"[bold]{fam}[/]: {', '.join(n for n in reg.names() if keep(n))}  [dim]({escape(use)})[/]")
        out.print("[dim]attar methods FAMILY for one line each; attar methods FAMILY NAME for a method's fields.[/]")
        return
    key = family.lower().rstrip("s") if family.lower() not in fams else family.lower()
    match = [f for f in fams if f == family.lower() or f.rstrip("s") == key]
    if not match:
        raise AttarError(f"Unknown method family {family!r}. Families: {', '.join(fams)}.")
    reg, keep, use = fams[match[0]]
    if name is None:
        t = Table("name", "what it does", title=f"{match[0]}: {use}")
        for n in (n for n in reg.names() if keep(n)):
            t.add_row(n, _summary(reg.get(n)))
        out.print(t)
        return
    if not keep(name):
        reg.get(name)  # unknown: the registry lists the known ones
        raise AttarError(f"{name!r} is not in family {match[0]!r}; see `attar methods` for where it belongs.")
    rows = _fields(reg, name)
    t = Table("field", "type", "default", "description", title=f"{match[0]} {name}: {_summary(reg.get(name))}")
    for f, d in rows.items():
        t.add_row(f, str(d["type"]), "required" if d["required"] else repr(d["default"]), str(d["description"]))
    out.print(t if rows else f"{match[0]} {name} takes no fields.")
