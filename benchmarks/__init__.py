"""Performance benchmarks of fedmerge measured side by side with Flower's own code paths.

Each benchmark is one command, ``python -m benchmarks.<name> [--quick]``:

- ``aggregation``: FedAvg merge throughput and peak memory, fedmerge vs Flower's FedAvg;
- ``round``: one and a few federated rounds, fedmerge vs a plain Flower simulation;
- ``scale``: 1,000 and 10,000 virtual clients, rounds per minute and server memory;
- ``smile``: SMILE construction on MiniLM-L6, full vs randomised SVD, time and accuracy.

Every measurement whose memory is reported runs in a fresh subprocess, so that one peak does not
hide another. Results are printed as Markdown tables headed by the machine they ran on.
"""
