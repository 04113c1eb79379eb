"""The tiny offline demo Molmo2 models: built, trained on synthetic shapes, shipped in shapes_model/."""
