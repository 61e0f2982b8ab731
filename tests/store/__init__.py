"""Tests of store/: every backend against one contract, the journal."""
