"""The ThousandEyes API: the run call, the rate limiter in front of it, and the simulator."""
