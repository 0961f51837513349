"""The harness that end-to-end tests and benchmarks share (as `transformers.testing_utils` is for its tests).

- `servers`: `ensemble-serve up` and vLLM's own OpenAI server in subprocesses, started, health-checked and
  stopped; private copies of the embedded population; Prometheus metric reads.
- `soak`: a bounded mixed-traffic load generator over loopback.

Nothing the server runs imports this package (`lint-imports` checks it).
"""
