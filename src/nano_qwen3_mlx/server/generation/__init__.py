"""The generation path every API shares: the call, the request, the run, the formatter, SSE."""
