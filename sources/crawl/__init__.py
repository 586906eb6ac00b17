"""Collect images for a new domain from the web: adapters, a polite and safe fetcher,
resumable state.
"""
