"""Command-line tools: serve, annotate a project, predict image files, train the demo."""
