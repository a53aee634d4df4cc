"""Generated protobuf modules for the telemetry schema in proto/ (do not edit)."""
