"""Developer tools (the ``devtools`` extra): the embedded broker, the local harness, the synthetic stream, evaluation and benchmarks."""
