"""Ray process plumbing: raylet settings, placement checks, credentials handed to workers, and a
local multi-node cluster (several raylets on 127.0.0.1) for tests and benches."""
