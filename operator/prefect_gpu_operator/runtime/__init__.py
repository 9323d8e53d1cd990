"""The operator's live state and its reconcile loop, between kopf's handlers and the adapters."""
