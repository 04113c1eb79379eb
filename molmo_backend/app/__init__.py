"""Transport: the HTTP routes Label Studio calls, the typed request, gunicorn and process wiring."""
