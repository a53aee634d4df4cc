"""The evaluator: per-stage statistics, guardrails, rollout stages and automatic rollback."""
