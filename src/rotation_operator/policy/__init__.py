"""The policy layer: validated configuration and the pure functions that decide.

No I/O at all: what to do is a function of gathered state, the request and the clock.
"""
