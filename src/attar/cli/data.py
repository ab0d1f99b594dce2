"""`attar data list|show`: the built-in and file data sets."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from attar.cli.app import app, out
from attar.console import fail as _fail
from attar.errors import AttarError

data_app = typer.Typer(no_args_is_help=True, help="Built-in and file data sets.")
app.add_typer(data_app, name="data")


@data_app.command("list")
def data_list():
    """Show the built-in data sets (images and tables, then text) and whether each is installed."""
    from attar.data import list_datasets
    from attar.text.sources import list_text_datasets

    for title, rows in (("images and tables", list_datasets()), ("text (finetune, lm stages, attar lm)", list_text_datasets())):
        t = Table("name", "available", "description", "install", title=title)
        for d in rows:
            t.add_row(d["name"], "yes" if d["available"] else "[red]no[/]", d["description"],
                      "" if d["available"] else d["install"])
        out.print(t)


@data_app.command("show")
def data_show(
    source: str = typer.Argument(..., help="a built-in name, an image folder, or a condensed-set folder"),
    png: Path = typer.Option(..., "--png", help="where to write the grid"),
    per_class: int = typer.Option(10, "--per-class", help="images per class (columns)"),
):
    """Render a data set's training images (or a condensed set) as a PNG grid, one row per class."""
    from attar.condense.render import render_grid
    from attar.data.artifact import SyntheticSet, is_condensed_artifact

    try:
        if Path(source).is_dir() and is_condensed_artifact(source):
            path = render_grid(source, png, per_class)
        else:
            from attar.data import load_data
            from attar.specs import DataSpec

            b = load_data(DataSpec(imagefolder=source) if Path(source).is_dir() else DataSpec(name=source))
            if not b.is_image:
                raise AttarError(f"{source!r} is a table (inputs of shape {tuple(b.input_shape)}), not images; nothing to draw.")
            s = SyntheticSet(x=b.train.x, y=b.train.y,  # inputs are in [0, 1]; render_grid takes the first per class
                             meta={"classes": b.classes, "method": "real", "ipc": per_class, "data_name": b.name})
            path = render_grid(s, png, per_class)
    except AttarError as e:
        _fail(e)
    out.print(f"wrote {path}")
