"""The model as trained: the checkpoint folder and its validation (`checkpoint`), the tokenization
every stage shares (`text`), the graph interfaces (`specs`), the PyTorch reference that the exported
graphs are checked against (`reference`), and checkpoints made without downloads (`demo`)."""
