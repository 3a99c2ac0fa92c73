"""nbpipe's benchmarks: run with ``make bench``; results go to docs/performance.md."""
