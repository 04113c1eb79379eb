"""Label Studio ML backend that turns keypoint labels into Molmo pointing prompts."""

__version__ = "0.1.0"
