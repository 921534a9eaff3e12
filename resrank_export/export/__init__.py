"""Stage 1: checkpoint -> FP32 ONNX graphs with `torch.onnx.export` (`onnx`), checked against the
PyTorch reference on real text (`parity`)."""

# The ONNX opsets a build exports (--opset): from the first with the ops the graphs need to the
# newest torch.onnx's exporter writes (torch.onnx._constants.ONNX_MAX_OPSET, 23 in torch 2.x) and
# ONNX Runtime runs. Kept here, free of imports, for the CLI's option range.
MIN_OPSET, MAX_OPSET = 17, 23
