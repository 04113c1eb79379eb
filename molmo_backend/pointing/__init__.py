"""Molmo's pointing language, free of torch and HTTP: prompts in, points and counts out."""
