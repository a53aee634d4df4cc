"""The local stack for development and demos: processes on this machine, a model stand-in and
the demo rollout.
"""
