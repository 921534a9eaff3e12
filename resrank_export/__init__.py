"""resrank-export: make a ResRank retrieval+reranking model deployable (ONNX, FP16/INT8,
TensorRT, FAISS, Triton)."""

__version__ = "0.1.0"
