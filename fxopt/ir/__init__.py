"""The IR: capture (torch.export to a canonical ATen graph), the export-friendly capture rewrites,
the dialect (op families, meta keys), graph-building and rewrite helpers, the pattern API and
the input guard of captured models. Everything else in fxopt works on what this package builds."""
