"""Inspection: graph snapshots, summaries, diffs, SVG rendering, the HTML report and timing."""
