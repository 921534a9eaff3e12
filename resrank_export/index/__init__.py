"""The corpus index: resumable chunked encoding with the exported encoder (`encode`), the FAISS
index over those vectors (`faiss_index`), loading and searching it (`retriever`), its report
(`report`), the stage that ties them (`stage`), and the deployed pipeline in-process (`pipeline`,
the Triton ensembles' reference)."""
