"""``m2f serve``: an HTTP API on Ray Serve (request parsing, JSON encoding, the deployment)."""
