"""Helpers the tests share: tiny models and datasets built from config, servers started on 127.0.0.1."""
