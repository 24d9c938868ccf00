"""One-off probes behind the notes (KERNEL_NOTES.md, NOTES.md): not scenarios of
``python -m benchmarks`` and not called by the engine; each runs as
``python -m benchmarks.experiments.<name> --out DIR``."""
