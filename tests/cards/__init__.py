"""Tests of cards/."""
