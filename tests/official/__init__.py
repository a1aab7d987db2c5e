"""Test-only copies of upstream model code, to check optimize() against the real thing (see each file's header)."""
