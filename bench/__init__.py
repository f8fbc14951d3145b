"""Benchmarks (``python -m bench.bench_methods`` and friends) and the plain transcription of
the authors' SPIDER rule they and the fidelity tests compare with
(``bench.spider_reference``). Installed with the project (pyproject's packages)."""
