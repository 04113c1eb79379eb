"""A task's image reference to a decoded image: which addresses may be fetched, how, and decoding."""
