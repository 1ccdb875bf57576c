"""Example agents, importable from the repository root as ``examples.<module>:<Class>``.

They are what ``examples/agents.yaml`` runs, and the starting point for agent authors:
each one shows a full observe/plan/act/learn loop against the public SDK only, so it
works the same on the sim engine in tests and on a real model in a daemon.
"""
