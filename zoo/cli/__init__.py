"""Command-line programs (thin shells over the library); see tools/."""
