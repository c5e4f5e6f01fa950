"""rag_jax's tests; a package so that benchmarks can import tests.oracles too."""
