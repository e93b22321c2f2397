"""The serving daemon: one long-lived process per allocation that serves chat requests and
runs durable OpenAI-style batch jobs. No torch at import time.

``batches`` holds the durable batch store (``BatchStore``: SQLite in ``state_dir``, batch
lifecycle, line scheduling, crash-safe exactly-once output files).
"""
