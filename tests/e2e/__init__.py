"""End-to-end tests: real servers on the real models, in-process runs of the larger real models (fashion, poem)
on their data, the real clients, training runs, the abuse suite, fuzzing and the browser test."""
