"""``quantkit ladder``: one model quantized into many GGUF types, scored against one reference pass.

An orchestration layer like the CLI: ``plan`` says what a ladder is (its types, its settings, its
directory), ``jobs`` makes one type's GGUF (here, or as a Ray task), ``run`` drives the whole ladder and
its report, ``card`` writes the directory's README.md.
"""
