"""The Envoy external-processing (ext_proc) sidecar: routing decisions and telemetry."""
