"""Per-request telemetry: what the sidecar observes about each response and how it is recorded."""
