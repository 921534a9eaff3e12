"""Text a user brings and the figures computed on it: readers for BEIR folders, JSONL, TSV and
plain-text corpora (`readers`), the embedded standard-library corpus (`default_corpus`), and IR
metrics (`evaluation`: nDCG@10, recall against exact search). Below every stage: imports none."""
