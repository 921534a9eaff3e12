"""Stage 3: TensorRT engines. Optimisation profiles from the build's maxima, plan builds with the
TensorRT Python API, an engine manifest that says where a plan may run, the equivalent `trtexec`
script for building by hand on the target, and the GPU memory planner (`plan`). Only
`tensorrt.py` imports TensorRT."""
