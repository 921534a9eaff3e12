"""Triton Inference Server deployment: model repository (configs + python-backend models),
a launcher for the tritonserver binary and query helpers."""
