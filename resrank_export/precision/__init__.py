"""Stage 2 (fp16 / bf16 / int8): calibration sets from real text (`calibration`), FP16 and BF16
(AutoCast) and INT8 (ModelOpt Q/DQ, with `smoothquant` first) graphs (`graphs`), how much they
change the outputs (`fidelity`), and the build stages that chain them (`stages`)."""

# The graph precisions a build makes (onnx/<precision>/); kept here, free of imports, so the CLI
# and every stage name the same list.
PRECISIONS = ("fp32", "fp16", "bf16", "int8")
HALF_PRECISIONS = ("fp16", "bf16")
