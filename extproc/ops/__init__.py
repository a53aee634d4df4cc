"""Operator surfaces, read from Redis: the status read model, `top`, the plan, the dashboard
and the shared number formatting.
"""
