"""Feedback: the teacher judges responses (verifier, likelihood, an LLM judge, corrections), and the
judgments become preference pairs and ranked lists for the ranking objectives."""
