"""One module a command: what `raytl extract`, `train`, `finetune`, `predict` and `pack` run, each from a
validated config (raytl.config). The CLI (raytl.cli) and the Python API (raytl.extract(...), ...) call them;
they share the layers beside them (storage, reader, preprocess, models, writer, ...)."""
