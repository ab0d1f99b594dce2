"""Reports: results tables, learning-curve and size/accuracy plots, Markdown and HTML.

matplotlib is imported only when a figure is drawn, so table helpers stay cheap for the CLI.
"""

from attar.report.tables import format_cell, format_metric, markdown_table, render_compare_table
from attar.report.writer import write_report

__all__ = ["format_cell", "format_metric", "markdown_table", "render_compare_table", "write_report"]
