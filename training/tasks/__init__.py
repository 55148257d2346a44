"""Embedded tasks: seeded generators of (prompt, answer) problems with exact verifiers."""
