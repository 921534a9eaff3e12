"""Stage 2 (fp16 / int8): calibration sets from real text (`calibration`), FP16 (AutoCast) and INT8
(ModelOpt Q/DQ, with `smoothquant` first) graphs (`graphs`), how much they change the outputs
(`fidelity`), and the build stages that chain them (`stages`)."""
