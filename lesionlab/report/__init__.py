"""Report: matplotlib figures and the self-contained HTML / Markdown study report."""
