"""The data planes' gRPC services: the ext_proc router and observer, the native plane's RTDS
layer and access-log receiver, and the process that serves them.
"""
