"""Envoy bootstrap configs generated from an experiment file, for either data plane."""
