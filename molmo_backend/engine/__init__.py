"""Engines answer (image, prompt) queries; the scheduler batches them onto one worker."""
