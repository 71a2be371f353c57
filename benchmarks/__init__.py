"""Speed and memory benchmarks for jaxsplit (``python -m benchmarks.run [--quick]``)."""
