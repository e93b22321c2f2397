"""Offline batch inference in the OpenAI Batch JSONL format.

``openai_format`` parses and validates input lines and builds output/error lines (pure,
no torch); ``runner.run_batch(engine, in_path, out_path, errors_path=None)`` streams a
file through an ``LLMEngine`` and returns a ``BatchSummary``.
"""
