"""TensorRT engine stage: optimisation profiles from the build's maxima, plan builds with the
TensorRT Python API, an engine manifest that says where a plan may run, and the equivalent
`trtexec` script for building by hand on the target. Only `tensorrt.py` imports TensorRT."""
