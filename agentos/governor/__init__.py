"""Quota governance: admission of inference calls, fair scheduling, policy rules."""
