"""The embedded pair: the tiny arithmetic teacher and student, trained from scratch here."""
