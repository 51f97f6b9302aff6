"""Real deployment helpers: credentials, and a local federation of SuperLink + SuperNodes."""
