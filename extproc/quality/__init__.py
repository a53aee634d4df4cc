"""Quality signals beyond status codes: answer rules (refusals, empty and invalid answers), the
LLM judge of shadow pairs, user feedback, the watchdog probes, and the worker that runs them.
"""
