"""Model sources other than the hub: generated tiny models for tests and smoke builds."""
