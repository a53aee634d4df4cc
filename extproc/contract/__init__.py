"""What every stage agrees on: Redis keys, headers, Envoy names, error types, assignment
hashing and lanes, the quality-signal schema and the guardrail metric registry.

Everything here is pure (no I/O, no imports from the rest of the package), so both data planes,
the evaluator and the operator tools can share it without pulling each other in.
"""
