"""Student backbone and projection heads."""
