"""Benchmarks (not tests): each measures ratios against a baseline timed in the same run and
returns a JSON-ready dict; `run_bench` runs the selected ones and renders JSON, Markdown and
plots. Layout: config (presets, data), timing (clock, machine info), one module per benchmark,
report (rendering)."""
