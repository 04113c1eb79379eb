"""The test suite, grouped like molmo_backend/: one folder a layer, e2e/ and docker/ for whole stacks."""
