"""Stage 1: checkpoint -> FP32 ONNX graphs with `torch.onnx.export` (`onnx`), checked against the
PyTorch reference on real text (`parity`)."""
